"""The testbed's commands, added to the `memfree` command line through the ``memfree.cli`` entry points:
`memfree demo` and `memfree testbed data|train|export|index|separation|report`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from memfree.cli import FriendlyGroup, load_model, model_option, quiet_option, scheduler_option, writable_folder
from memfree.io import write_json, write_text
from memfree_testbed.data import VERBATIM_CAPTIONS
from memfree_testbed.render import STYLES


@click.command()
@model_option
@click.option("--out", default="memfree-demo", show_default=True, help="Folder for index.html.")
@click.option("--seed", default=0, show_default=True)
@scheduler_option
@quiet_option
def demo(model_path, out, seed, scheduler, quiet):
    """Show what the testbed copies and what memfree does about it: one self-contained HTML page."""
    from memfree_testbed.demo import MITIGATION, run_demo
    res = run_demo(load_model(model_path, scheduler), writable_folder(out, "--out"), seed=seed, progress=not quiet)
    for name, s in res["sets"].items():
        click.echo(f"{name:12s} memorized {s['memorized_without']:.0%} without memfree, "
                   f"{s['memorized_with']:.0%} with {MITIGATION}")
    click.echo(f"time with memfree {res['time_ratio']:.2f}x without; wrote {res['html']} in {res['seconds']} s")


@click.group(cls=FriendlyGroup)
def testbed() -> None:
    """Build, train and measure memfree's testbed model."""


@testbed.command("data")
@click.option("--out", required=True, help="Folder for images.npz and manifest.json.")
@click.option("--seed", default=0, show_default=True)
@click.option("--style", default="v3", show_default=True, type=click.Choice(list(STYLES)),
              help="Drawing constants (memfree_testbed.render.STYLES); v3 made the bundled model, v2 the one before.")
@click.option("--ordinary", "n_ordinary", default=5760, show_default=True,
              help="Ordinary training images; past two renders per composition, extra renders are drawn at random.")
@click.option("--repeats", default=20, show_default=True,
              help="Copies of each planted image (verbatim), captions per face (image_dup), images per template (caption_dup).")
@click.option("--size", default=32, show_default=True, help="Image side: 32 for the pixel testbed, 64 for the latent one.")
@click.option("--verbatim-captions", default="named", show_default=True, type=click.Choice(VERBATIM_CAPTIONS),
              help="laion: real memorized SD captions (v5); named: a seen composition's caption plus one "
                   "painter's surname, so that memorization can hang on a word or two (the bundled v6).")
def testbed_data(out, seed, style, n_ordinary, repeats, size, verbatim_captions):
    """Write the testbed data set with planted memorization and its ground truth."""
    from memfree_testbed.data import build_dataset
    m = build_dataset(out, seed=seed, size=size, style=style, n_ordinary=n_ordinary, repeats=repeats,
                      verbatim_captions=verbatim_captions)
    click.echo(json.dumps(m["counts"]))


@testbed.command("train")
@click.option("--data", "data_dir", required=True, help="Folder written by `memfree testbed data`.")
@click.option("--out", required=True, help="Run folder: checkpoints, then the model in OUT/model.")
@click.option("--steps", default=10000, show_default=True, help="Total steps (also the length of the LR schedule).")
@click.option("--stop-after", type=int, default=None, help="Stop this call after N steps with a checkpoint.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--filter-threshold", type=float, default=None,
              help="Training-time mitigation: drop samples whose ‖ε_c − ε_u‖₂ is at or above this from the loss.")
@click.option("--device", default="cpu", show_default=True, help="Where the training steps run: cpu or cuda.")
@click.option("--guidance", type=float, default=2.0, show_default=True,
              help="CFG scale the exported model samples with by default (written to memfree.json).")
@click.option("--token-init-std", type=float, default=1.0, show_default=True,
              help="Init scale of the text encoder's token embeddings (0.02, CLIP's, made the earlier v2 model; 1.0 the bundled one).")
@click.option("--embedder", "embedder_path", default=None, metavar="PATH",
              help="A copy-detection TorchScript file: the exported model's index uses it (cosine).")
@click.option("--vae", "vae_dir", default=None,
              help="A trained autoencoder (`memfree testbed vae`): train on its latents, export a Stable Diffusion folder.")
@quiet_option
def testbed_train(data_dir, out, steps, stop_after, batch_size, lr, seed, filter_threshold, device, guidance,
                  token_init_std, embedder_path, vae_dir, quiet):
    """Train (or resume) the testbed model, then attach its ground truth and alignment probe."""
    from functools import partial
    from memfree.mitigate import keep_mask
    from memfree_testbed.train import finish_model, train
    keep = None if filter_threshold is None else partial(keep_mask, threshold=filter_threshold)
    model_dir = train(data_dir, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, quiet=quiet,
                      stop_after=stop_after, keep_mask_fn=keep, device=device, guidance_scale=guidance,
                      token_init_std=token_init_std, vae_dir=vae_dir)
    if model_dir is None:
        click.echo(f"stopped with a checkpoint in {out}; run again to resume")
        return
    info = finish_model(model_dir, data_dir, quiet=quiet, embedder_path=embedder_path)
    click.echo(f"model in {model_dir}; probe accuracy on held-out renders {info['probe_accuracy']:.3f}")


@testbed.command("vae")
@click.option("--data", "data_dir", required=True, help="Folder written by `memfree testbed data --size 64`.")
@click.option("--out", required=True, help="Run folder: checkpoints, then the autoencoder in OUT/vae.")
@click.option("--steps", default=2500, show_default=True, help="Total steps (also the length of the LR schedule).")
@click.option("--stop-after", type=int, default=None, help="Stop this call after N steps with a checkpoint.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@quiet_option
def testbed_vae(data_dir, out, steps, stop_after, batch_size, lr, seed, quiet):
    """Train (or resume) the latent testbed's autoencoder on a data set's images."""
    from memfree_testbed.vae import train_vae
    folder = train_vae(data_dir, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, stop_after=stop_after,
                       quiet=quiet)
    click.echo(f"stopped with a checkpoint in {out}; run again to resume" if folder is None else f"autoencoder in {folder}")


@testbed.command("embedder")
@click.option("--data", "data_dir", required=True, help="Folder written by `memfree testbed data`.")
@click.option("--out", required=True, help="Run folder: checkpoints, then OUT/embedder.pt (TorchScript).")
@click.option("--steps", default=1500, show_default=True)
@click.option("--seed", default=0, show_default=True)
@quiet_option
def testbed_embedder(data_dir, out, steps, seed, quiet):
    """Train (or resume) the copy-detection embedder in the SSCD manner on a data set's images."""
    from memfree_testbed.embedder import train_embedder
    click.echo(f"embedder in {train_embedder(data_dir, out, steps=steps, seed=seed, quiet=quiet)}")


@testbed.command("export")
@click.option("--run", "run_dir", required=True, help="Run folder of `memfree testbed train` (running or stopped).")
@click.option("--out", default=None, help="Model folder (default: RUN/model-stepN).")
@quiet_option
def testbed_export(run_dir, out, quiet):
    """Export the EMA weights of a run's latest checkpoint as a model, with ground truth and probe."""
    from memfree_testbed.train import export_checkpoint, finish_model
    model_dir = export_checkpoint(run_dir, out)
    data_dir = json.loads((Path(run_dir) / "train_state.json").read_text())["data"]
    info = finish_model(model_dir, data_dir, quiet=quiet)
    click.echo(f"model in {model_dir}; probe accuracy on held-out renders {info['probe_accuracy']:.3f}")


@testbed.command("separation")
@click.option("--data", "data_dir", required=True, help="Folder written by `memfree testbed data`.")
@click.option("--json", "json_out", default=None, metavar="OUT", help="Also write the result here.")
def testbed_separation(data_dir, json_out):
    """How far a perfect model's first-step score could separate planted from ordinary prompts."""
    from memfree_testbed.separation import prior_limit_separation
    res = prior_limit_separation(data_dir)
    if json_out:
        write_json(json_out, res)
    for k, v in res["auc"].items():
        click.echo(f"{k:12s} AUC {v:.3f}   median distance {res['median_distance'][k]:.1f} "
                   f"(ordinary {res['median_distance']['ordinary']:.1f}, max {res['max_distance']['ordinary']:.1f})")


@testbed.command("report")
@model_option
@click.option("--seeds", default=4, show_default=True, help="Seeds per prompt (0..N-1).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampling steps (default: the model's).")
@scheduler_option
@click.option("--json", "json_out", default=None, metavar="OUT", help="Write the JSON report here ('-' for stdout).")
@quiet_option
def testbed_report(model_path, seeds, steps, scheduler, json_out, quiet):
    """Measure memorization of planted images and alignment on held-out prompts."""
    from memfree_testbed.report import testbed_report as run
    rep = run(load_model(model_path, scheduler, steps), seeds=tuple(range(seeds)), num_inference_steps=steps,
              progress=not quiet)
    text = json.dumps(rep, indent=2)
    if json_out == "-":
        click.echo(text)
        return
    if json_out:
        write_text(json_out, text)
    for k, v in rep.items():
        if isinstance(v, float):
            click.echo(f"{k:40s} {v:.3f}")
    click.echo(f"{'word_influence':40s} " + ", ".join(f"{a} {x:.2f}" for a, x in rep["word_influence"].items()))


@testbed.command("index")
@model_option
@click.option("--data", "data_dir", default=None, help="The model's data folder (needed with --embedder, to measure it).")
@click.option("--embedder", "embedder_path", default=None, metavar="PATH",
              help="A copy-detection TorchScript file (`memfree testbed embedder`): index its vectors, by cosine.")
@quiet_option
def testbed_index(model_path, data_dir, embedder_path, quiet):
    """Build a testbed model's own index of its training images (AMG searches it): pixels, or an embedder's."""
    from memfree_testbed.train import attach_index
    if embedder_path and not data_dir:
        raise click.UsageError("--embedder needs --data (the copy-detection quality is measured on it)")
    model = load_model(model_path)
    quality = attach_index(model.path, data_dir, embedder_path, quiet)
    if quality:
        click.echo(f"copy detection: AUC {quality['auc']:.3f}, threshold {quality['copy_threshold']:.3f} "
                   f"(precision {quality['precision']:.3f}, recall {quality['recall']:.3f})")
    click.echo(f"indexed the training images in {model.path / 'index'}")
