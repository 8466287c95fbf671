"""The `memfree` command line. Every command takes --model PATH (default: the bundled testbed)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from memfree.mitigate import METHODS
from memfree.model import SCHEDULERS, ModelError
from memfree.testbed.data import VERBATIM_CAPTIONS
from memfree.testbed.render import STYLES


def _load(model: str | None, scheduler: str = "ddim"):
    import memfree
    return memfree.load(model, scheduler=scheduler)


model_option = click.option("--model", "model_path", default=None, metavar="PATH",
                            help="Local diffusers-layout model directory (default: the bundled testbed).")
scheduler_option = click.option("--scheduler", default="ddim", show_default=True,
                                help=f"Sampler: {', '.join(SCHEDULERS)}.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None, column: str | None = None) -> list[str]:
    """Prompts from arguments and/or a file (text, CSV or JSONL); an empty list is an error."""
    from memfree.detect import read_prompt_file
    out = list(prompts)
    if prompts_file:
        out += read_prompt_file(prompts_file, column)
    if not out:
        raise click.UsageError("no prompts given: pass PROMPT arguments or --prompts FILE")
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
@click.option("--prompts", "prompts_file", default=None, metavar="FILE", help="Prompts file (text, CSV, JSONL).")
@model_option
@click.option("--mitigation", default="none", show_default=True,
              type=click.Choice(METHODS),
              help="wen: prompt-embedding optimisation (selective); rta/rna/gni/cwr: Somepalli et al.; "
                   "amg*: Anti-Memorization Guidance and its ablations.")
@click.option("--target", type=float, default=None,
              help="wen's target score (default: the calibrated threshold; wen still acts only on flagged prompts).")
@click.option("--max-iters", type=click.IntRange(min=1), default=10, show_default=True,
              help="wen's most optimisation steps per image.")
@click.option("--index", "index_dir", default=None, metavar="DIR",
              help="Training-set index for AMG (memfree index build; default: the one the model ships).")
@click.option("--amg-c1", type=float, default=None, help="AMG despecification scale.")
@click.option("--amg-c2", type=float, default=None, help="AMG caption-deduplication scale.")
@click.option("--amg-c3", type=float, default=None, help="AMG dissimilarity scale (x̂0 step per unit gradient).")
@click.option("--amg-lambda", default=None, metavar="LO,HI", help="AMG gate λ at the noisiest step and at t = 0.")
@click.option("--amg-terms", default=None, metavar="T,T", help="AMG terms to use, of spe,dup,sim.")
@click.option("--amg-check-every", type=int, default=None, help="AMG: check σ every n-th step until under watch.")
@click.option("--amg-screen", type=float, default=None,
              help="AMG two-stage gate: skip images whose first-step detection score is under this.")
@click.option("--amg-watch", type=float, default=None, help="AMG: σ above which an image is checked every step.")
@click.option("--amg-always", is_flag=True, default=None, help="AMG ablation: guide at every step, ignoring the gate.")
@click.option("--amg-k", type=int, default=None, help="AMG: neighbours averaged in nL2 (pixel indexes).")
@click.option("--amg-alpha", type=float, default=None, help="AMG: α of nL2.")
@click.option("--amg-grid", type=int, default=None,
              help="AMG: the dissimilarity step keeps the mean of each cell of a GRID×GRID split (0: off).")
@click.option("--seed", default=0, show_default=True, help="Image i of a request uses seed + i.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@click.option("--guidance", type=float, default=None, help="CFG scale (default: the model's).")
@scheduler_option
@click.option("--out", default="memfree-out", show_default=True, help="Folder for PNG files.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@quiet_option
def generate(prompts, prompts_file, model_path, mitigation, target, max_iters, index_dir, amg_c1, amg_c2, amg_c3,
             amg_lambda, amg_terms, amg_check_every, amg_screen, amg_watch, amg_always, amg_k, amg_alpha, amg_grid,
             seed, steps, guidance, scheduler, out, as_json, quiet):
    """Generate images with an optional mitigation; report the detection score before and after, and
    the nearest training image when the model is a testbed."""
    from PIL import Image
    from memfree.mitigate import generate as run
    from memfree.sampling import to_uint8
    prompts = read_prompts(prompts, prompts_file)
    model = _load(model_path, scheduler)
    if steps is not None:
        model.defaults["num_inference_steps"] = steps
    if guidance is not None:
        model.defaults["guidance_scale"] = guidance
    index = None
    if (model.path / "testbed" / "manifest.json").exists():
        from memfree.testbed.bundle import load_testbed
        index = load_testbed(model).index
    amg = {"c1": amg_c1, "c2": amg_c2, "c3": amg_c3, "check_every": amg_check_every, "screen": amg_screen,
           "watch": amg_watch, "always_on": amg_always, "k": amg_k, "alpha": amg_alpha, "grid": amg_grid}
    if amg_lambda is not None:
        try:
            amg["lam_lo"], amg["lam_hi"] = (float(v) for v in amg_lambda.split(","))
        except ValueError:
            raise click.UsageError(f"--amg-lambda takes two numbers LO,HI, got {amg_lambda!r}")
    if amg_terms is not None:
        amg["terms"] = tuple(t.strip() for t in amg_terms.split(",") if t.strip())
    train_index = None
    if index_dir is not None:
        from memfree.index import TrainingIndex
        train_index = TrainingIndex.load(index_dir)
    res = run(model, prompts, mitigation, seed, target=target, max_iters=max_iters, index=index,
              train_index=train_index, amg=amg, progress=not quiet)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (rep, img) in enumerate(zip(res.reports, res.images)):
        path = out_dir / f"{i:04d}.png"
        Image.fromarray(to_uint8(img)).save(path)
        rows.append({"image": str(path), **rep.to_dict()})
    if as_json:
        click.echo(json.dumps({"mitigation": mitigation, "seconds": round(res.seconds, 3), "images": rows}, indent=2))
        return
    for r in rows:
        near = "" if r["nl2"] is None else f"  nearest #{r['nearest_id']} nL2 {r['nl2']:.2f}" + (
            " MEMORIZED" if r["memorized"] else "")
        did = f"  ({mitigation}: {r['iterations']} it)" if mitigation == "wen" and r["applied"] else ""
        if "amg" in r["extra"]:
            fired = {k: v for k, v in r["extra"]["amg"]["fired_steps"].items() if v}
            did = "  (amg: " + (", ".join(f"{k} at {len(v)} steps from {v[0]}" for k, v in fired.items())
                                if fired else "not triggered") + ")"
        click.echo(f"{r['image']}  score {r['score_before']:.3f} -> {r['score_after']:.3f}{did}{near}  {r['prompt']}")


prompts_file_option = click.option("--prompts", "prompts_file", default=None, metavar="FILE",
                                   help="Prompts file: one a line, or CSV/JSONL with --column.")
column_option = click.option("--column", default=None, help="Column of a CSV/JSONL prompts file.")


@cli.command()
@click.argument("prompts", nargs=-1)
@prompts_file_option
@column_option
@model_option
@click.option("--steps", default=1, show_default=True, help="Score the first K sampling steps.")
@click.option("--generations", default=1, show_default=True, help="Average over N starting noises.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@quiet_option
def detect(prompts, prompts_file, column, model_path, steps, generations, seed, as_json, quiet):
    """Score prompts for memorization (Wen et al.): mean ‖ε_c − ε_u‖₂, threshold and verdict."""
    from memfree.detect import detect as run
    prompts = read_prompts(prompts, prompts_file, column)
    res = run(_load(model_path), prompts, steps=steps, generations=generations, seed=seed, progress=not quiet)
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
@click.option("--steps", default=1, show_default=True)
@click.option("--generations", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--method", type=click.Choice(["occlusion", "gradient"]), default="occlusion", show_default=True,
              help="occlusion: score drop when the word is deleted; gradient: Wen et al.'s embedding gradient.")
@click.option("--json", "as_json", is_flag=True)
def explain(prompt, model_path, steps, generations, seed, method, as_json):
    """Per-word significance for memorization; the terminal colours words by significance."""
    from memfree.explain import explain as run
    res = run(_load(model_path), prompt, steps=steps, generations=generations, seed=seed, method=method)
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
@click.option("--steps", default=1, show_default=True)
@click.option("--generations", default=1, show_default=True)
@quiet_option
def calibrate(prompts_file, column, model_path, fpr, steps, generations, quiet):
    """Set the detection threshold from ordinary prompts and store it in the model's memfree.json."""
    from memfree.detect import calibrate as run
    prompts = read_prompts((), prompts_file, column)
    entry = run(_load(model_path), prompts, fpr=fpr, steps=steps, generations=generations, progress=not quiet)
    click.echo(json.dumps(entry, indent=2))


@cli.group(cls=FriendlyGroup)
def bench() -> None:
    """Benchmarks on the testbed."""


@bench.command("mitigate")
@model_option
@click.option("--methods", default="none,wen,rta,rna,gni,cwr,amg,amg-strong", show_default=True,
              help="Comma-separated methods; AMG ablations: amg-all-terms, amg-no-spe, amg-no-dup, amg-no-sim, amg-always, "
                   "amg-const, amg-every, amg-screen.")
@click.option("--sets", default="verbatim,image_dup,caption_dup,paraphrase,heldout", show_default=True,
              help="Comma-separated prompt sets.")
@click.option("--seeds", default=4, show_default=True, help="Seeds per prompt.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@click.option("--json", "json_out", default="bench-mitigate.json", show_default=True, metavar="OUT",
              help="Results, written row by row; an interrupted run resumes from it.")
@click.option("--plot", default="bench-mitigate.png", show_default=True, metavar="PNG")
@click.option("--table", default="bench-mitigate.md", show_default=True, metavar="MD")
@quiet_option
def bench_mitigate(model_path, methods, sets, seeds, steps, json_out, plot, table, quiet):
    """Mitigations side by side on the testbed (MemBench-style): memorization, similarity, alignment,
    Fréchet distance and cost."""
    from memfree.bench.mitigate import format_table, run_bench
    model = _load(model_path)
    if steps is not None:
        model.defaults["num_inference_steps"] = steps
    res = run_bench(model, json_out, [m.strip() for m in methods.split(",") if m.strip()],
                    [s.strip() for s in sets.split(",") if s.strip()], tuple(range(seeds)), plot, not quiet)
    text = format_table(res["rows"])
    Path(table).write_text(text + "\n")
    click.echo(text)
    click.echo(f"wrote {json_out}, {table}, {plot}")


@bench.command("filter")
@model_option
@click.option("--thresholds", default="1,2,3,4,6", show_default=True, help="Comma-separated τ values.")
@click.option("--samples", default=1024, show_default=True, help="Training samples to score.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_out", default=None, metavar="OUT")
def bench_filter(model_path, thresholds, samples, seed, json_out):
    """Would the training-time filter drop the planted samples? Scores per kind of training sample."""
    from memfree.bench.filter import filter_rates, format_table
    try:
        taus = tuple(float(v) for v in thresholds.split(","))
    except ValueError:
        raise click.UsageError(f"--thresholds takes comma-separated numbers, got {thresholds!r}") from None
    res = filter_rates(_load(model_path), taus, samples, seed)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))
    click.echo(format_table(res))


@bench.command("overhead")
@model_option
@click.option("--methods", default="amg,amg-every,amg-screen,wen", show_default=True)
@click.option("--set", "prompt_set", default="heldout", show_default=True,
              help="Testbed prompt set, or several joined by commas (a mixed set), or 'all'.")
@click.option("--prompts", "prompts_file", default=None, metavar="FILE", help="Or a prompts file.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--json", "json_out", default=None, metavar="OUT")
@quiet_option
def bench_overhead(model_path, methods, prompt_set, prompts_file, repeats, json_out, quiet):
    """Time added by each mitigation over `none`: repeats interleaved batch by batch, median ratio."""
    from memfree.bench.overhead import measure_overhead
    model = _load(model_path)
    if prompts_file:
        prompts = read_prompts((), prompts_file)
    else:
        from memfree.testbed.bundle import load_testbed
        try:
            prompts = load_testbed(model).prompts(prompt_set)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    names = [m.strip() for m in methods.split(",") if m.strip()]
    res = measure_overhead(model, prompts, names, repeats, progress=not quiet)
    res["prompt_set"] = prompts_file or prompt_set
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))
    for r in res["rows"]:
        click.echo(f"{r['method']:>12}  {r['seconds_per_image']:.3f} s/image  ×{r['overhead_ratio']:.3f} none  "
                   f"(rounds: {', '.join(f'{x:.3f}' for x in r['ratios'])})  "
                   f"in pieces {100 * r['piece_share']:.1f}% of none")


@bench.command("detect")
@model_option
@click.option("--json", "json_out", default="bench-detect.json", show_default=True, metavar="OUT")
@click.option("--plot", default="bench-detect-roc.png", show_default=True, metavar="PNG")
@click.option("--negatives", default=100, show_default=True, help="Prompts per negative set.")
@quiet_option
def bench_detect(model_path, json_out, plot, negatives, quiet):
    """Detectors side by side: AUC, TPR@1%FPR and seconds per prompt; explanation by deletion."""
    from memfree.bench.detect import format_table, run_bench
    res = run_bench(_load(model_path), json_out, plot, n_negative=negatives, progress=not quiet)
    click.echo(format_table(res))
    click.echo(f"wrote {json_out} and {plot}")


@cli.group(cls=FriendlyGroup)
def testbed() -> None:
    """Build, train and measure memfree's testbed model."""


@testbed.command("data")
@click.option("--out", required=True, help="Folder for images.npz and manifest.json.")
@click.option("--seed", default=0, show_default=True)
@click.option("--style", default="v3", show_default=True, type=click.Choice(list(STYLES)),
              help="Drawing constants (memfree.testbed.render.STYLES); v3 made the bundled model, v2 the one before.")
@click.option("--ordinary", "n_ordinary", default=2400, show_default=True,
              help="Ordinary training images; past two renders per composition, extra renders are drawn at random.")
@click.option("--repeats", default=50, show_default=True,
              help="Copies of each planted image (verbatim), captions per face (image_dup), images per template (caption_dup).")
@click.option("--verbatim-captions", default="laion", show_default=True, type=click.Choice(VERBATIM_CAPTIONS),
              help="laion: real memorized SD captions (v5); named: a seen composition's caption plus one "
                   "painter's surname, so that memorization can hang on a word or two (the bundled v6).")
def testbed_data(out, seed, style, n_ordinary, repeats, verbatim_captions):
    """Write the testbed data set with planted memorization and its ground truth."""
    from memfree.testbed.data import build_dataset
    m = build_dataset(out, seed=seed, style=style, n_ordinary=n_ordinary, repeats=repeats,
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
@quiet_option
def testbed_train(data_dir, out, steps, stop_after, batch_size, lr, seed, filter_threshold, device, guidance,
                  token_init_std, quiet):
    """Train (or resume) the testbed model, then attach its ground truth and alignment probe."""
    from functools import partial
    from memfree.mitigate import keep_mask
    from memfree.testbed.train import finish_model, train
    keep = None if filter_threshold is None else partial(keep_mask, threshold=filter_threshold)
    model_dir = train(data_dir, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, quiet=quiet,
                      stop_after=stop_after, keep_mask_fn=keep, device=device, guidance_scale=guidance,
                      token_init_std=token_init_std)
    if model_dir is None:
        click.echo(f"stopped with a checkpoint in {out}; run again to resume")
        return
    info = finish_model(model_dir, data_dir, quiet=quiet)
    click.echo(f"model in {model_dir}; probe accuracy on held-out renders {info['probe_accuracy']:.3f}")


@testbed.command("export")
@click.option("--run", "run_dir", required=True, help="Run folder of `memfree testbed train` (running or stopped).")
@click.option("--out", default=None, help="Model folder (default: RUN/model-stepN).")
@quiet_option
def testbed_export(run_dir, out, quiet):
    """Export the EMA weights of a run's latest checkpoint as a model, with ground truth and probe."""
    from memfree.testbed.train import export_checkpoint, finish_model
    model_dir = export_checkpoint(run_dir, out)
    data_dir = json.loads((Path(run_dir) / "train_state.json").read_text())["data"]
    info = finish_model(model_dir, data_dir, quiet=quiet)
    click.echo(f"model in {model_dir}; probe accuracy on held-out renders {info['probe_accuracy']:.3f}")


@testbed.command("separation")
@click.option("--data", "data_dir", required=True, help="Folder written by `memfree testbed data`.")
@click.option("--json", "json_out", default=None, metavar="OUT", help="Also write the result here.")
def testbed_separation(data_dir, json_out):
    """How far a perfect model's first-step score could separate planted from ordinary prompts."""
    from memfree.testbed.separation import prior_limit_separation
    res = prior_limit_separation(data_dir)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))
    for k, v in res["auc"].items():
        click.echo(f"{k:12s} AUC {v:.3f}   median distance {res['median_distance'][k]:.1f} "
                   f"(ordinary {res['median_distance']['ordinary']:.1f}, max {res['max_distance']['ordinary']:.1f})")


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
    click.echo(f"{'word_influence':40s} " + ", ".join(f"{a} {x:.2f}" for a, x in rep["word_influence"].items()))


@cli.group("index", cls=FriendlyGroup)
def index_group() -> None:
    """Nearest-neighbour indexes of training images (used by anti-memorization guidance)."""


@index_group.command("build")
@click.option("--images", required=True, metavar="DIR_OR_MANIFEST",
              help="Folder of images, or a testbed data folder / its manifest.json.")
@click.option("--captions", default=None, metavar="FILE",
              help="Captions for a folder of images: .txt (sorted file order), .jsonl or .csv with file,caption.")
@click.option("--embedder", default="pixel", show_default=True,
              help="pixel, pixel:SIZE, sscd:PATH or torchscript:PATH (optionally :SIZE after the path).")
@click.option("--out", required=True, help="Index folder; an interrupted build resumes from it.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--factory", default="auto", show_default=True, type=click.Choice(["auto", "flat", "sq8", "ivfpq"]),
              help="FAISS index type; auto is exact up to 200k images, IVF+PQ above.")
@quiet_option
def index_build(images, captions, embedder, out, batch_size, factory, quiet):
    """Embed training images and write a FAISS index with their ids and captions."""
    from memfree.index import build_index, load_image_source, parse_embedder
    source, ids, caps = load_image_source(images, captions)
    idx = build_index(source, out, parse_embedder(embedder), ids=ids, captions=caps, batch_size=batch_size,
                      factory=factory, progress=not quiet)
    click.echo(f"indexed {len(idx)} images, dim {idx.embedder.dim}, {idx.factory}, in {out}")


def main() -> None:
    cli(prog_name="memfree")


if __name__ == "__main__":
    main()
