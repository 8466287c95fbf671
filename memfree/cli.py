"""The `memfree` command line. Every command takes --model PATH (default: the bundled testbed)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from memfree.model import SCHEDULERS, ModelError


def _load(model: str | None, scheduler: str = "ddim"):
    import memfree
    return memfree.load(model, scheduler=scheduler)


model_option = click.option("--model", "model_path", default=None, metavar="PATH",
                            help="Local diffusers-layout model directory (default: the bundled testbed).")
scheduler_option = click.option("--scheduler", default="ddim", show_default=True,
                                help=f"Sampler: {', '.join(SCHEDULERS)}.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    """Prompts from arguments and/or a file with one prompt per line; an empty list is an error."""
    out = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.exists():
            raise click.BadParameter(f"{path} does not exist", param_hint="--prompts")
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise click.UsageError("no prompts given: pass PROMPT arguments or --prompts FILE with one prompt a line")
    if any(not p.strip() for p in out):
        raise click.UsageError("empty prompt given")
    return out


class FriendlyGroup(click.Group):
    """Turns the library's input errors into one-line CLI errors instead of tracebacks."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ModelError, FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=FriendlyGroup)
@click.version_option(package_name="memfree")
def cli() -> None:
    """memfree: detect, explain and mitigate memorization in text-to-image diffusion models."""


@cli.command()
@model_option
@click.option("--out", default="memfree-demo", show_default=True, help="Folder for index.html.")
@click.option("--seed", default=0, show_default=True)
@scheduler_option
@quiet_option
def demo(model_path, out, seed, scheduler, quiet):
    """Show what the testbed copies: planted images beside generations for their captions."""
    from memfree.testbed.demo import run_demo
    res = run_demo(_load(model_path, scheduler), out, seed=seed, progress=not quiet)
    for name, s in res["sets"].items():
        copy = "" if s["copy_rate"] is None else f", copies of the planted image {s['copy_rate']:.0%}"
        click.echo(f"{name:12s} memorized {s['memorization_rate']:.0%}{copy}")
    click.echo(f"wrote {res['html']} in {res['seconds']} s")


@cli.command()
@click.argument("prompts", nargs=-1)
@click.option("--prompts", "prompts_file", default=None, metavar="FILE", help="One prompt a line.")
@model_option
@click.option("--seed", default=0, show_default=True, help="Image i of a request uses seed + i.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@click.option("--guidance", type=float, default=None, help="CFG scale (default: the model's).")
@scheduler_option
@click.option("--out", default="memfree-out", show_default=True, help="Folder for PNG files.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@quiet_option
def generate(prompts, prompts_file, model_path, seed, steps, guidance, scheduler, out, as_json, quiet):
    """Generate images, with the free per-step detection score of each."""
    import numpy as np
    from PIL import Image
    from memfree.sampling import sample
    prompts = read_prompts(prompts, prompts_file)
    model = _load(model_path, scheduler)
    res = sample(model, prompts, seed, num_inference_steps=steps, guidance_scale=guidance, progress=not quiet)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (p, img) in enumerate(zip(prompts, res.images)):
        path = out_dir / f"{i:04d}.png"
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        rows.append({"prompt": p, "seed": seed + i, "image": str(path),
                     "first_step_score": float(res.scores[i, 0])})
    if as_json:
        click.echo(json.dumps({"images": rows}, indent=2))
    else:
        for r in rows:
            click.echo(f"{r['image']}  score {r['first_step_score']:.3f}  {r['prompt']}")


@cli.group(cls=FriendlyGroup)
def testbed() -> None:
    """Build, train and measure memfree's testbed model."""


@testbed.command("data")
@click.option("--out", required=True, help="Folder for images.npz and manifest.json.")
@click.option("--seed", default=0, show_default=True)
def testbed_data(out, seed):
    """Write the testbed data set with planted memorization and its ground truth."""
    from memfree.testbed.data import build_dataset
    m = build_dataset(out, seed=seed)
    click.echo(json.dumps(m["counts"]))


@testbed.command("train")
@click.option("--data", "data_dir", required=True, help="Folder written by `memfree testbed data`.")
@click.option("--out", required=True, help="Run folder: checkpoints, then the model in OUT/model.")
@click.option("--steps", default=3200, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=6e-4, show_default=True)
@click.option("--seed", default=0, show_default=True)
@quiet_option
def testbed_train(data_dir, out, steps, batch_size, lr, seed, quiet):
    """Train (or resume) the testbed model, then attach its ground truth and alignment probe."""
    from memfree.testbed.train import finish_model, train
    model_dir = train(data_dir, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, quiet=quiet)
    info = finish_model(model_dir, data_dir, quiet=quiet)
    click.echo(f"model in {model_dir}; probe accuracy on held-out renders {info['probe_accuracy']:.3f}")


@testbed.command("report")
@model_option
@click.option("--seeds", default=4, show_default=True, help="Seeds per prompt (0..N-1).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@scheduler_option
@click.option("--json", "json_out", default=None, metavar="OUT", help="Write the JSON report here ('-' for stdout).")
@quiet_option
def testbed_report(model_path, seeds, steps, scheduler, json_out, quiet):
    """Measure memorization of planted images and alignment on held-out prompts."""
    from memfree.testbed.report import testbed_report as run
    rep = run(_load(model_path, scheduler), seeds=tuple(range(seeds)), num_inference_steps=steps,
              progress=not quiet)
    text = json.dumps(rep, indent=2)
    if json_out == "-":
        click.echo(text)
        return
    if json_out:
        Path(json_out).write_text(text)
    for k, v in rep.items():
        if isinstance(v, float):
            click.echo(f"{k:40s} {v:.3f}")


def main() -> None:
    cli(prog_name="memfree")


if __name__ == "__main__":
    main()
