"""The `memfree` command line. Every command takes --model PATH or NAME (default: the one named model installed).

Packages add commands through the entry-point group ``memfree.cli`` (a click command or group each).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from importlib.metadata import entry_points
from pathlib import Path

import click

from memfree.model import SCHEDULERS, ModelError

CLI_ENTRY_POINTS = "memfree.cli"


def load_model(model: str | None, scheduler: str = "ddim", steps: int | None = None, guidance: float | None = None):
    """Open a model for a command, with the command's sampler, steps and guidance scale."""
    import memfree
    m = memfree.load(model, scheduler=scheduler)
    changes = {k: v for k, v in (("num_inference_steps", steps), ("guidance_scale", guidance)) if v is not None}
    return m.with_settings(**changes) if changes else m


model_option = click.option("--model", "model_path", default=None, metavar="PATH|NAME",
                            help="Local diffusers-layout model directory, or a named model "
                                 "(default: $MEMFREE_MODEL, or the one named model installed).")
scheduler_option = click.option("--scheduler", default="ddim", show_default=True,
                                help=f"Sampler: {', '.join(SCHEDULERS)}.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")
SEED = click.IntRange(0, 2**62)   # room for seed + i, and within what torch's generators take
prompts_file_option = click.option("--prompts", "prompts_file", default=None, metavar="FILE",
                                   help="Prompts file: one a line, or CSV/JSONL with --column.")
column_option = click.option("--column", default=None, help="Column of a CSV/JSONL prompts file.")


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None, column: str | None = None) -> list[str]:
    """Prompts from arguments and/or a file (text, CSV or JSONL); an empty list is an error."""
    from memfree.prompts import read_prompt_file
    out = list(prompts)
    if prompts_file:
        out += read_prompt_file(prompts_file, column)
    if not out:
        raise click.UsageError("no prompts given: pass PROMPT arguments or --prompts FILE")
    if any(not p.strip() for p in out):
        raise click.UsageError("empty prompt given")
    return out


def writable_folder(path: str, option: str) -> Path:
    """Make sure outputs can be written to the folder ``path`` before any work starts."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise click.UsageError(f"{option} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".memfree-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise click.UsageError(f"{option} {folder} cannot be written to: {e.strerror or e}") from None
    return folder


def parse_options(method: str, pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` strings to a method's typed options (numbers, booleans, comma-separated tuples)."""
    from memfree.mitigate import METHODS, method_options
    if method not in METHODS:
        raise click.UsageError(f"unknown mitigation {method!r}; choose one of {', '.join(METHODS)}")
    known = method_options(method)
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise click.UsageError(f"--opt {pair!r}: {method} takes KEY=VALUE with KEY one of "
                                   f"{', '.join(known) or '(no options)'}")
        kind = known[key][0]
        try:
            if text.lower() in ("none", "") and "None" in kind:
                value = None
            elif "tuple" in kind:
                value = tuple(v.strip() for v in text.split(",") if v.strip())
            elif "bool" in kind:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1", "yes")
            elif "int" in kind:
                value = int(text)
            elif "float" in kind:
                value = float(text)
            else:
                value = text
        except ValueError:
            raise click.UsageError(f"--opt {pair!r}: {key} takes a value of type {kind}") from None
        out[key] = value
    return out


class FriendlyGroup(click.Group):
    """Turns every error a user can reach into one line naming its cause (a traceback only with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.Abort, click.exceptions.Exit, KeyboardInterrupt):
            raise
        except (ModelError, FileNotFoundError, ValueError) as e:
            if _debug(ctx):
                raise
            raise click.ClickException(str(e)) from e
        except Exception as e:   # anything else is a bug or an environment problem: still one line
            if _debug(ctx):
                raise
            raise click.ClickException(f"{type(e).__name__}: {e} (run with --debug for the traceback)") from e

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            if ctx.parent is None and "No such command" in str(e):
                e.message += (" Other commands come from installed plugin packages (entry-point group "
                              f"{CLI_ENTRY_POINTS}); the README's set-up installs the testbed's and the benchmarks'.")
            raise


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) if root.params else False


class MemfreeCLI(FriendlyGroup):
    """The root group: its own commands, and those installed packages register under ``memfree.cli``
    (loaded when asked for, so a plugin's imports cost nothing to the other commands)."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | {ep.name for ep in entry_points(group=CLI_ENTRY_POINTS)})

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None:
            found = [ep for ep in entry_points(group=CLI_ENTRY_POINTS) if ep.name == name]
            command = found[0].load() if found else None
        return command


@click.group(cls=MemfreeCLI)
@click.version_option(package_name="memfree")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def cli(debug: bool) -> None:
    """memfree: detect, explain and mitigate memorization in text-to-image diffusion models."""


def _image_stem(prompt: str, seed: int, method: str, settings: dict) -> str:
    """A file name that two different requests cannot share: the seed, the method and a hash of the rest."""
    key = hashlib.sha1(json.dumps([prompt, seed, method, settings], sort_keys=True, default=str).encode()).hexdigest()
    return f"s{seed}-{method}-{key[:10]}"


@cli.command()
@click.argument("prompts", nargs=-1)
@click.option("--prompts", "prompts_file", default=None, metavar="FILE", help="Prompts file (text, CSV, JSONL).")
@model_option
@click.option("--mitigation", default="none", show_default=True,
              help="A registered method (`memfree mitigations` lists them and their options): wen, rta, rna, gni, "
                   "cwr, amg, amg-strong and AMG's ablations.")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="An option of the mitigation, e.g. --opt target_scale=1.0 (wen) or --opt c3=300 (amg); repeatable.")
@click.option("--index", "index_dir", default=None, metavar="DIR",
              help="Training-set index (memfree index build): AMG searches it and every image's nearest training "
                   "item is reported (default: the index the model ships, if any).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Image i of a request uses seed + i.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampling steps (default: the model's).")
@click.option("--guidance", type=float, default=None, help="CFG scale (default: the model's).")
@scheduler_option
@click.option("--out", default="memfree-out", show_default=True, help="Folder for PNG files and their JSON reports.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@quiet_option
def generate(prompts, prompts_file, model_path, mitigation, opts, index_dir, seed, steps, guidance, scheduler, out,
             as_json, quiet):
    """Generate images with an optional mitigation; report the detection score before and after, and the
    nearest training item when an index is available."""
    from memfree.images import save_png
    from memfree.index import TrainingIndex
    from memfree.io import write_json
    from memfree.mitigate import default_indexes, generate as run, method_options
    from memfree.pipelines import pipeline_family
    from memfree.similarity import nearest_training
    prompts = read_prompts(prompts, prompts_file)
    options = parse_options(mitigation, opts)
    if pipeline_family(model_path):   # SDXL and SD3 folders: their own pipeline under memfree.protect
        _generate_on_pipeline(model_path, prompts, mitigation, options, index_dir, seed, steps, guidance, scheduler,
                              out, as_json, quiet)
        return
    model = load_model(model_path, scheduler, steps, guidance)
    indexes = [TrainingIndex.load(index_dir)] if index_dir is not None else []
    if not indexes and model.path is not None and (model.path / "index" / "meta.json").exists():
        indexes = default_indexes(model)
    index = indexes[0] if indexes else None   # the one the report names the nearest item of
    if indexes and "index" in method_options(mitigation) and "index" not in options:
        options["index"] = indexes   # the method searches the indexes the model ships, the report's first
    out_dir = writable_folder(out, "--out")   # before the work, not after it
    res = run(model, prompts, mitigation, seed, progress=not quiet, **options)
    nearest = nearest_training(index, res.images) if index is not None else [None] * len(prompts)
    settings = {"model": model.label, "steps": model.settings.num_inference_steps,
                "guidance": model.settings.guidance_scale, "scheduler": scheduler,
                "options": {k: v for k, v in options.items() if k != "index"}}
    rows = []
    for rep, img, near in zip(res.reports, res.images, nearest):
        stem = _image_stem(rep.prompt, rep.seed, mitigation, settings)
        path = save_png(img, out_dir / f"{stem}.png")
        row = {"image": str(path), **rep.to_dict(), "nearest": near, "settings": settings}
        write_json(out_dir / f"{stem}.json", row)
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"mitigation": mitigation, "seconds": round(res.seconds, 3), "images": rows}, indent=2))
        return
    for r in rows:
        near = "" if r["nearest"] is None else f"  nearest #{r['nearest']['id']} σ {r['nearest']['similarity']:.2f}" + (
            " MEMORIZED" if r["nearest"]["memorized"] else "")
        did = f"  ({mitigation}: {r['iterations']} it)" if mitigation == "wen" and r["applied"] else ""
        if "amg" in r["extra"]:
            fired = {k: v for k, v in r["extra"]["amg"]["fired_steps"].items() if v}
            did = "  (amg: " + (", ".join(f"{k} at {len(v)} steps from {v[0]}" for k, v in fired.items())
                                if fired else "not triggered") + ")"
        click.echo(f"{r['image']}  score {r['score_before']:.3f} -> {r['score_after']:.3f}{did}{near}  {r['prompt']}")


def _generate_on_pipeline(model_path, prompts, mitigation, options, index_dir, seed, steps, guidance, scheduler, out,
                          as_json, quiet) -> None:
    from dataclasses import asdict
    from memfree.io import write_json
    from memfree.model import resolve_model
    from memfree.pipelines import PIPELINE_METHODS, open_pipeline, pipeline_generate
    if mitigation not in PIPELINE_METHODS:
        raise click.UsageError(f"on SDXL and SD3 folders --mitigation is one of {', '.join(PIPELINE_METHODS)} "
                               f"(run through memfree.protect on the folder's own pipeline)")
    if scheduler != "ddim":
        raise click.UsageError("SDXL and SD3 folders sample with the scheduler they ship: leave out --scheduler")
    if mitigation.startswith("amg") and index_dir is None and "index" not in options:
        raise click.UsageError("AMG needs an index of the images to steer away from: --index DIR")
    path, _ = resolve_model(model_path)
    out_dir = writable_folder(out, "--out")
    pipe = open_pipeline(path)
    options = {"index": index_dir, **options}
    t0 = time.perf_counter()
    results = pipeline_generate(pipe, prompts, mitigation, seed=seed, num_inference_steps=steps,
                                guidance_scale=guidance, progress=not quiet, **options)
    seconds = time.perf_counter() - t0
    settings = {"model": str(path), "steps": steps, "guidance": guidance,
                "options": {k: v for k, v in options.items() if k != "index"}}
    rows = []
    for i, (prompt, (image, report)) in enumerate(zip(prompts, results)):
        stem = _image_stem(prompt, seed + i, mitigation, settings)
        image.save(out_dir / f"{stem}.png")
        row = {"image": str(out_dir / f"{stem}.png"), "prompt": prompt, "seed": seed + i, "method": mitigation,
               **asdict(report), "settings": settings}
        write_json(out_dir / f"{stem}.json", row)
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"mitigation": mitigation, "seconds": round(seconds, 3), "images": rows}, indent=2))
        return
    for r in rows:
        verdict = "" if r["flagged"] is None else ("  FLAGGED" if r["flagged"] else "  ok")
        near = "" if r["nearest_id"] is None else f"  nearest #{r['nearest_id']} σ {r['similarity']:.2f}"
        did = "  (mitigated)" if r["mitigated"] else ""
        click.echo(f"{r['image']}  score {r['score']:.3f}{verdict}{did}{near}  {r['prompt']}")


@cli.command()
def mitigations():
    """List the registered mitigations and their options (pass them with --opt KEY=VALUE)."""
    from memfree.mitigate import METHODS, method_options
    for name in METHODS:
        text = ", ".join(f"{k}={v}" for k, (_, v) in method_options(name).items())
        click.echo(f"{name:14s} {text or '(no options)'}")
    click.echo("AMG values are those for a pixel (l2) index; with a cosine (SSCD) index the cosine preset applies.")


@cli.command()
@click.argument("prompts", nargs=-1)
@prompts_file_option
@column_option
@model_option
@click.option("--steps", default=1, show_default=True, type=click.IntRange(min=1), help="Score the first K sampling steps.")
@click.option("--generations", default=1, show_default=True, type=click.IntRange(min=1),
              help="Average over N starting noises.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Audit at scale: scores to DIR/scores.parquet in chunks; an interrupted run resumes.")
@click.option("--ray", "use_ray", is_flag=True, help="With --out: score across Ray workers (a local Ray).")
@click.option("--ray-address", default=None, metavar="ADDR", help="With --out: an existing Ray cluster.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="Ray workers.")
@click.option("--chunk", default=1024, show_default=True, type=click.IntRange(min=1), help="Prompts per chunk.")
@quiet_option
def detect(prompts, prompts_file, column, model_path, steps, generations, seed, as_json, out_dir, use_ray,
           ray_address, workers, chunk, quiet):
    """Score prompts for memorization (Wen et al.): mean ‖ε_c − ε_u‖₂, threshold and verdict."""
    from memfree.detect import detect as run
    from memfree.pipelines import open_pipeline, pipeline_detect, pipeline_family
    prompts = read_prompts(prompts, prompts_file, column)
    if out_dir or use_ray or ray_address:
        if not out_dir or steps != 1:
            raise click.UsageError("an audit at scale (--ray) needs --out DIR and scores the first step (--steps 1)")
        from memfree.detect_scale import detect_at_scale
        res = detect_at_scale(model_path, prompts, out_dir, chunk, generations, seed, use_ray, ray_address, workers)
        rate = f", {res['prompts_per_s']} prompts/s" if res["prompts_per_s"] else ""
        click.echo(f"scored {res['scored_now']} of {res['prompts']} prompts in {res['seconds']} s{rate}: "
                   f"{Path(out_dir) / 'scores.parquet'}")
        return
    if pipeline_family(model_path):   # SDXL and SD3 folders: scored through memfree.protect on their own pipeline
        if steps != 1:
            raise click.UsageError("SDXL and SD3 folders are scored at the first step only (--steps 1)")
        res = pipeline_detect(open_pipeline(model_path), prompts, generations=generations, seed=seed)
    else:
        res = run(load_model(model_path), prompts, steps=steps, generations=generations, seed=seed,
                  progress=not quiet)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in res], indent=2))
        return
    for r in res:
        verdict = "uncalibrated" if r.memorized is None else ("MEMORIZED" if r.memorized else "ok")
        click.echo(f"{r.score:9.4f}  {verdict:12s} {r.prompt}")
    if res and res[0].threshold is not None:
        click.echo(f"threshold {res[0].threshold:.4f}")


@cli.command()
@click.argument("prompt")
@model_option
@click.option("--steps", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--generations", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--method", type=click.Choice(["occlusion", "gradient"]), default="occlusion", show_default=True,
              help="occlusion: score drop when the word is deleted; gradient: Wen et al.'s embedding gradient.")
@click.option("--json", "as_json", is_flag=True)
def explain(prompt, model_path, steps, generations, seed, method, as_json):
    """Per-word significance for memorization; the terminal colours words by significance."""
    from memfree.explain import explain as run
    from memfree.pipelines import open_pipeline, pipeline_explain, pipeline_family
    if pipeline_family(model_path):   # SDXL and SD3 folders: occlusion, scored on their own pipeline
        if method != "occlusion" or steps != 1:
            raise click.UsageError("SDXL and SD3 folders are explained by occlusion at the first step only")
        from memfree.model import resolve_model
        res = pipeline_explain(open_pipeline(resolve_model(model_path)[0]), prompt, generations, seed)
    else:
        res = run(load_model(model_path), prompt, steps=steps, generations=generations, seed=seed, method=method)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        return
    top = max(max(res.significance, default=0.0), 1e-12)
    colours = ["bright_black", "white", "yellow", "bright_red"]  # occlusion can be negative: grey
    lead = set(res.top_words(2))
    words = [click.style(w, fg=colours[max(0, min(3, int(4 * s / top)))], bold=i in lead)
             for i, (w, s) in enumerate(zip(res.words, res.significance))]
    click.echo(" ".join(words))
    click.echo(f"score {res.score:.4f}; " + ", ".join(f"{w}={s:.3g}" for w, s in zip(res.words, res.significance)))


@cli.command()
@prompts_file_option
@column_option
@model_option
@click.option("--fpr", default=0.01, show_default=True, help="False-positive rate allowed on these prompts.")
@click.option("--steps", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--generations", default=1, show_default=True, type=click.IntRange(min=1))
@quiet_option
def calibrate(prompts_file, column, model_path, fpr, steps, generations, quiet):
    """Set the detection threshold from ordinary prompts and store it with the model (the output says where:
    the model folder, or a user file when the folder is read-only or the model was opened by name)."""
    from memfree.detect import calibrate as run
    from memfree.pipelines import pipeline_calibrate, pipeline_family
    prompts = read_prompts((), prompts_file, column)
    if pipeline_family(model_path):   # SDXL and SD3 folders: scored on their own pipeline, as protect scores
        if steps != 1:
            raise click.UsageError("SDXL and SD3 folders are calibrated at the first step only (--steps 1)")
        from memfree.model import resolve_model
        click.echo(json.dumps(pipeline_calibrate(resolve_model(model_path)[0], prompts, fpr, generations), indent=2))
        return
    entry = run(load_model(model_path), prompts, fpr=fpr, steps=steps, generations=generations, progress=not quiet)
    click.echo(json.dumps(entry, indent=2))


@cli.group("index", cls=FriendlyGroup)
def index_group() -> None:
    """Nearest-neighbour indexes of training images (used by anti-memorization guidance)."""


@index_group.command("build")
@click.option("--images", required=True, metavar="SOURCE",
              help="Training images: a folder of images; or webdataset .tar shards (img2dataset) or .parquet files "
                   "(id, caption, image bytes or image_path): a file, a folder of them or a glob, local or a URL.")
@click.option("--captions", default=None, metavar="FILE",
              help="Captions for a folder of images: .txt (sorted file order), .jsonl or .csv with file,caption.")
@click.option("--embedder", default="pixel", show_default=True,
              help="pixel, pixel:SIZE, sscd:PATH or torchscript:PATH (optionally :SIZE after the path).")
@click.option("--out", required=True, help="Index folder; an interrupted build resumes from it.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--factory", default="auto", show_default=True,
              type=click.Choice(["auto", "flat", "fp16", "sq8", "ivfpq"]),
              help="FAISS index type; auto is exact up to 200k images, IVF+PQ above.")
@click.option("--ray", "use_ray", is_flag=True, help="Embed on Ray Data (a local Ray started on --workers CPUs).")
@click.option("--ray-address", default=None, metavar="ADDR", help="Embed on an existing Ray cluster (e.g. auto).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="Embedding actors.")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Memory the index may take when searched (e.g. 4GB): sets IVF-PQ's lists and code size.")
@click.option("--shard-size", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Images per shard of a folder (tar and parquet files are a shard each).")
@click.option("--final-embedder", default=None, metavar="SPEC",
              help="Two-stage search: --embedder finds candidates, this one (e.g. sscd:PATH) ranks them and gives "
                   "the similarity. Builds at scale.")
@quiet_option
def index_build(images, captions, embedder, out, batch_size, factory, use_ray, ray_address, workers, memory_budget,
                shard_size, final_embedder, quiet):
    """Embed training images and write a FAISS index with their ids and captions. Shards, parquet, Ray or a memory
    budget build an index at scale: resumable shard by shard, opened memory-mapped (docs/index-at-scale.md)."""
    from memfree.index import build_index, load_image_source, parse_embedder
    local = Path(images)
    plain = local.is_dir() and not any(p.suffix.lower() in (".tar", ".parquet") for p in local.iterdir())
    if plain and not (use_ray or ray_address or memory_budget or final_embedder):
        source, ids, caps = load_image_source(images, captions)
        idx = build_index(source, out, parse_embedder(embedder), ids=ids, captions=caps, batch_size=batch_size,
                          factory=factory, progress=not quiet)
        click.echo(f"indexed {len(idx)} images, dim {idx.embedder.dim}, {idx.factory}, in {out}")
        return
    import time
    from memfree.index_scale import build_scaled, parse_size
    if factory == "sq8":
        raise click.UsageError("--factory sq8 is not available at scale: use auto, flat or ivfpq")
    t0, done = time.perf_counter(), []

    def on_shard(info: dict) -> None:
        done.append(info)
        if not quiet:
            click.echo(f"shard {info['shard']}: {info['rows']} images, {info['skipped']} skipped", err=True)

    idx = build_scaled(images, out, parse_embedder(embedder), captions, batch_size, shard_size,
                       parse_size(memory_budget or "4GB"), factory, use_ray, ray_address, workers, on_shard,
                       final_embedder=parse_embedder(final_embedder) if final_embedder else None)
    s = idx.meta["scale"]
    seconds = time.perf_counter() - t0
    click.echo(f"indexed {len(idx)} images ({s['skipped']} skipped: unreadable) from {s['shards']} shards, "
               f"dim {idx.embedder.dim}, {idx.factory}, in {out} ({seconds:.1f} s, "
               f"{sum(i['rows'] for i in done) / seconds:.0f} images/s embedded now)")


@index_group.command("latent-screen")
@model_option
@click.option("--images", required=True, metavar="DIR", help="A folder of the training images.")
@click.option("--out", default=None, metavar="FILE", help="The screen's safetensors file (AMG's latent_screen=).")
@click.option("--index", "index_dir", default=None, metavar="DIR",
              help="Or put it in this index's folder, where AMG finds it and screens with it by default.")
@click.option("--bar", type=click.FloatRange(0, 1), default=None,
              help="With --index: the latent σ bar to record in its tuning.json (default: AMG's, 0.3).")
@click.option("--size", type=click.IntRange(min=8), default=None,
              help="Side the images are resized to before encoding (default: the VAE's sample size).")
@click.option("--grid", default=8, show_default=True, type=click.IntRange(min=1), help="Latents pooled to grid×grid.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@quiet_option
def index_latent_screen(model_path, images, out, index_dir, bar, size, grid, batch_size, quiet):
    """Encode training images with the model's VAE into a latent screen: AMG's cheap first stage, which sends an
    image to the full check only when its x̂0 comes near a training latent. Put in an index's folder (--index),
    AMG uses it by default together with the first-step score screen at the model's calibrated threshold."""
    from memfree.index import load_image_source
    from memfree.model import resolve_model
    from memfree.similarity import SCREEN_FILE, latent_screen_from_files, write_index_tuning
    if (out is None) == (index_dir is None):
        raise click.UsageError("give one of --out FILE and --index DIR")
    if bar is not None and index_dir is None:
        raise click.UsageError("--bar is recorded in an index's tuning.json: use it with --index")
    if index_dir is not None and not (Path(index_dir) / "meta.json").is_file():
        raise click.UsageError(f"{index_dir} is not a built index (no meta.json)")
    files, _, _ = load_image_source(images)
    path, _ = resolve_model(model_path)
    screen = latent_screen_from_files(path, files, size, grid, batch_size, progress=not quiet)
    target = Path(out) if out is not None else Path(index_dir) / SCREEN_FILE
    tmp = target.with_name(target.name + ".tmp")
    screen.save(tmp)
    os.replace(tmp, target)   # a screen is there whole or not at all
    if bar is not None:
        write_index_tuning(index_dir, latent_bar=bar)
    click.echo(f"encoded {len(screen)} images into {target} (latents pooled to {grid}×{grid})")


@index_group.command("add")
@click.option("--index", "index_dir", required=True, metavar="DIR", help="A built index (memfree index build).")
@click.option("--images", required=True, metavar="DIR",
              help="Folder of images to add (e.g. your own, to protect); their file names are their ids.")
@click.option("--captions", default=None, metavar="FILE",
              help="Captions for the images: .txt (sorted file order), .jsonl or .csv with file,caption.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@quiet_option
def index_add(index_dir, images, captions, batch_size, quiet):
    """Add images to an index, embedded with its own embedder; AMG then steers away from them as from training
    images. An interrupted add resumes; ids already in the index are refused."""
    from memfree.index import add_to_index, load_image_source
    source, ids, caps = load_image_source(images, captions)
    idx = add_to_index(index_dir, source, ids=ids, captions=caps, batch_size=batch_size, progress=not quiet)
    click.echo(f"added {len(ids)} images to {index_dir}: {len(idx)} in all")


@cli.group("audit", cls=FriendlyGroup)
def audit_group() -> None:
    """Audit a training set for the duplication that makes models memorize."""


def _read_items(path: str) -> list[tuple[str, str | None]]:
    """Training items from JSONL: {"id", "caption"} a line, one line per time the pair is trained (or a "count")."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out += [(str(row["id"]), row.get("caption"))] * int(row.get("count", 1))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise click.UsageError(f"--items {path} line {n}: expected a JSON object with id, caption "
                                   "(and optionally count)") from None
    return out


@audit_group.command("data")
@click.option("--index", "index_dir", default=None, metavar="DIR", help="A built index of the training images.")
@click.option("--model", "model_path", default=None, metavar="PATH|NAME",
              help="Audit a model's own index (<model>/index) and the training items an installed package "
                   "provides for it (with planted ground truth, precision and recall are scored).")
@click.option("--items", "items_file", default=None, metavar="FILE.jsonl",
              help="Training items: {\"id\", \"caption\"[, \"count\"]} a line, repeats included (default: each "
                   "indexed image once under its caption).")
@click.option("--json", "json_out", default=None, metavar="OUT", help="Write the report as JSON.")
@click.option("--html", "html_out", default=None, metavar="OUT", help="Write a self-contained HTML page.")
@click.option("--min-size", default=2, show_default=True, type=click.IntRange(min=2),
              help="Leave out clusters trained fewer times than this.")
@click.option("--threshold", default=None, type=float,
              help="Near-identical bar: RMS pixel difference in [0, 1] for an l2 index (default 0.125), "
                   "cosine for a cosine index (default 0.85).")
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1), help="Neighbours searched per image.")
def audit_data_command(index_dir, model_path, items_file, json_out, html_out, min_size, threshold, k):
    """Find duplicate clusters in a training set (verbatim repeats, one image under many captions, one caption
    over near-identical images), ranked by how often they are trained."""
    from memfree.audit import audit_data, ground_truth_for, render_html, score_against
    from memfree.index import TrainingIndex
    from memfree.io import write_json, write_text
    truth, label = None, index_dir
    if index_dir is None:
        from memfree.model import resolve_model
        folder, name = resolve_model(model_path)
        label = f"{name or Path(folder).name}/index"   # the model's own index, named without a machine's path
        if not (Path(folder) / "index" / "meta.json").exists():
            raise click.UsageError(f"{folder} ships no training-set index: pass --index DIR")
        index_dir, truth = Path(folder) / "index", ground_truth_for(folder)
    elif model_path is not None:
        raise click.UsageError("pass --index or --model, not both")
    for out, option in ((json_out, "--json"), (html_out, "--html")):
        if out:
            writable_folder(str(Path(out).parent), option)
    index = TrainingIndex.load(index_dir)
    items = _read_items(items_file) if items_file else (truth or {}).get("items")
    report = audit_data(index, items, threshold=threshold, k=k, min_size=min_size)
    report["summary"]["index"] = str(label)
    if truth and truth.get("groups") and not items_file:
        report["score"] = score_against(report, truth["groups"])
        report["precision"], report["recall"] = report["score"]["precision"], report["score"]["recall"]
    s = report["summary"]
    click.echo(f"{s['clusters']} clusters in {s['images']} images / {s['training_items']} training items "
               f"({', '.join(f'{n} {kind}' for kind, n in s['by_kind'].items())}) in {s['seconds']} s")
    for c in report["clusters"][:10]:
        click.echo(f"  #{c['rank']:<3d} {c['kind']:11s} trained {c['training_count']:>5d}  images {c['size']:>4d}  "
                   f"{(c['captions'][0] if c['captions'] else '')[:70]}")
    if "score" in report:
        click.echo(f"planted groups: precision {report['precision']:.3f}, recall {report['recall']:.3f}")
    if json_out:
        write_json(json_out, report)
    if html_out:
        write_text(html_out, render_html(report, index))


@cli.command()
@model_option
@click.option("--index", "index_dir", default=None, metavar="DIR",
              help="Training-set index for AMG and for every image's nearest training item (default: the index the "
                   "model ships, if any).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="MEMFREE_API_KEY", default=None, metavar="KEY",
              help="Require `Authorization: Bearer KEY` on every call but the page and /healthz "
                   "(default: $MEMFREE_API_KEY; none: open to whoever reaches the address).")
@click.option("--mitigation", default="amg", show_default=True, type=click.Choice(["none", "wen", "amg"]),
              help="The mitigation of a request that names none.")
@click.option("--queue-size", default=8, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait behind the running one; more are answered 503 with Retry-After.")
@click.option("--max-n", default=4, show_default=True, type=click.IntRange(min=1), help="Images per request.")
@click.option("--max-steps", default=100, show_default=True, type=click.IntRange(min=1),
              help="Sampling steps a request may ask for (at least the model's default).")
@scheduler_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(model_path, index_dir, host, port, api_key, mitigation, queue_size, max_n, max_steps, scheduler, log_level):
    """Serve the model over HTTP: POST /v1/images/generations (OpenAI-shaped, protected by memfree),
    POST /v1/memorization/check, and at / a page to look into a prompt. API docs at /docs."""
    try:
        from memfree.serve import create_app, local_host, run
    except ImportError as e:
        raise click.ClickException(f"memfree serve needs FastAPI and uvicorn ({e}): pip install 'memfree[serve]'")
    if api_key is not None and not api_key.strip():
        raise click.UsageError("--api-key is empty")
    model = load_model(model_path, scheduler)
    app = create_app(model, index=index_dir, api_key=api_key, queue_size=queue_size, max_n=max_n,
                     max_steps=max_steps, default_mitigation=mitigation)
    service = app.state.service
    if not local_host(host) and not api_key:
        click.echo(f"warning: listening on {host} without an API key: anyone who reaches it can use the model "
                   "(set --api-key or MEMFREE_API_KEY)", err=True)
    amg = "" if service.index is not None else "; no training-set index, so requests must ask for none or wen"
    click.echo(f"memfree serves {model.label} ({service.size}, default mitigation {mitigation}{amg}) on "
               f"http://{host}:{port}/  (API docs: /docs)", err=True)
    run(app, host, port, log_level)


def main() -> None:
    cli(prog_name="memfree")


if __name__ == "__main__":
    main()
