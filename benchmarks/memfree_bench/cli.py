"""The benchmark commands, added to the `memfree` command line through the ``memfree.cli`` entry points:
`memfree bench detect|mitigate|filter|overhead`, all on a testbed model with its ground truth, and
`memfree bench cost`, the price of protection on random models of the real architectures; `memfree bench serve`
puts `memfree serve` under load; `memfree bench index`, the training-set index at scale on synthetic vectors."""
from __future__ import annotations

import os

import click

from memfree.cli import FriendlyGroup, load_model, model_option, parse_options, quiet_option, read_prompts
from memfree.io import write_json, write_text


@click.group(cls=FriendlyGroup)
def bench() -> None:
    """Benchmarks on the testbed."""


@bench.command("mitigate")
@model_option
@click.option("--methods", default="none,wen,rta,rna,gni,cwr,amg,amg-strong", show_default=True,
              help="Comma-separated methods; AMG ablations: amg-all-terms, amg-no-spe, amg-no-dup, amg-no-sim, amg-always, "
                   "amg-const, amg-every, amg-screen.")
@click.option("--sets", default="verbatim,image_dup,caption_dup,paraphrase,heldout", show_default=True,
              help="Comma-separated prompt sets.")
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(min=1), help="Seeds per prompt.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N prompts of each set.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampling steps (default: the model's).")
@click.option("--opt", "opts", multiple=True, metavar="METHOD:KEY=VALUE",
              help="An option of one method, e.g. --opt wen:target_scale=1.0; repeatable.")
@click.option("--json", "json_out", default="bench-mitigate.json", show_default=True, metavar="OUT",
              help="Results, written row by row; an interrupted run resumes from it.")
@click.option("--plot", default="bench-mitigate.png", show_default=True, metavar="PNG")
@click.option("--table", default="bench-mitigate.md", show_default=True, metavar="MD")
@quiet_option
def bench_mitigate(model_path, methods, sets, seeds, limit, steps, opts, json_out, plot, table, quiet):
    """Mitigations side by side on the testbed (MemBench-style): memorization, similarity, alignment,
    Fréchet distance and cost."""
    from memfree_bench.mitigate import format_table, run_bench
    options: dict[str, dict] = {}
    for o in opts:
        method, sep, pair = o.partition(":")
        if not sep:
            raise click.UsageError(f"--opt {o!r}: write METHOD:KEY=VALUE, e.g. wen:target_scale=1.0")
        options.setdefault(method, {}).update(parse_options(method, (pair,)))
    model = load_model(model_path, steps=steps)
    res = run_bench(model, json_out, [m.strip() for m in methods.split(",") if m.strip()],
                    [s.strip() for s in sets.split(",") if s.strip()], tuple(range(seeds)), plot, not quiet, options, limit)
    text = format_table(res["rows"])
    write_text(table, text + "\n")
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
    from memfree_bench.filter import filter_rates, format_table
    try:
        taus = tuple(float(v) for v in thresholds.split(","))
    except ValueError:
        raise click.UsageError(f"--thresholds takes comma-separated numbers, got {thresholds!r}") from None
    res = filter_rates(load_model(model_path), taus, samples, seed)
    if json_out:
        write_json(json_out, res)
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
    from memfree_bench.overhead import measure_overhead
    model = load_model(model_path)
    if prompts_file:
        prompts = read_prompts((), prompts_file)
    else:
        from memfree_testbed.bundle import load_testbed
        try:
            prompts = load_testbed(model).prompts(prompt_set)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    names = [m.strip() for m in methods.split(",") if m.strip()]
    res = measure_overhead(model, prompts, names, repeats, progress=not quiet)
    res["prompt_set"] = prompts_file or prompt_set
    if json_out:
        write_json(json_out, res)
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
    from memfree_bench.detect import format_table, run_bench
    res = run_bench(load_model(model_path), json_out, plot, n_negative=negatives, progress=not quiet)
    click.echo(format_table(res))
    click.echo(f"wrote {json_out} and {plot}")


def _chosen(text: str, allowed, option: str) -> list[str]:
    """A comma-separated list of names, each one of ``allowed``; a usage error naming the unknown ones."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        raise click.UsageError(f"{option}: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(allowed)}")
    return names


@bench.command("cost")
@click.option("--arch", "archs", default="sd15", show_default=True,
              help="Comma-separated architectures: sd15, sd21, sdxl, sd3 (random weights, real sizes), or tiny.")
@click.option("--resolution", type=click.IntRange(min=64), default=None,
              help="Image side in pixels, a multiple of 64 (default: each architecture's own: 512, 768, 1024, 1024).")
@click.option("--steps", default=4, show_default=True, type=click.IntRange(min=1), help="Sampling steps per image.")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1),
              help="Rounds over all methods (each round one image per method).")
@click.option("--vectors", default=1_000_000, show_default=True, type=click.IntRange(min=100),
              help="Random 512-d vectors in the index AMG searches.")
@click.option("--cache", default="memfree-out/bench-cost-cache", show_default=True, metavar="DIR",
              help="Where the tokenizer, the TorchScript embedder and the index are kept between runs.")
@click.option("--methods", default=None, metavar="LIST",
              help="Comma-separated subset of none, detect, wen, amg-clean, amg-fired, amg-screened (default: all).")
@click.option("--json", "json_out", default=None, metavar="OUT")
@quiet_option
def bench_cost(archs, resolution, steps, repeats, vectors, cache, methods, json_out, quiet):
    """What protection costs at the real size: seconds per image and peak memory of none, detect, wen,
    amg-clean and amg-fired in one interleaved run (ratios to none), and the cost of each component.
    CPU by default; CUDA in fp16 when it is there."""
    from memfree_bench.cost import ARCHS, METHODS, format_table, run_cost
    names = _chosen(archs, ARCHS, "--arch")
    if resolution is not None and resolution % 64:
        raise click.UsageError(f"--resolution must be a multiple of 64, got {resolution}")
    chosen = METHODS if methods is None else tuple(_chosen(methods, METHODS, "--methods"))
    res = run_cost(names, resolution, steps, repeats, vectors, cache, progress=not quiet, methods=chosen)
    if json_out:
        write_json(json_out, res)
    click.echo(format_table(res))
    if json_out:
        click.echo(f"wrote {json_out}")


@bench.command("serve")
@model_option
@click.option("--clients", default=32, show_default=True, type=click.IntRange(min=1), help="Concurrent clients.")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="How long the clients start new requests.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1), help="Sampling steps per generation.")
@click.option("--generate-share", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Share of requests that generate (the others check a prompt).")
@click.option("--mitigation", default="amg", show_default=True, type=click.Choice(["none", "wen", "amg"]))
@click.option("--queue-size", default=8, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "json_out", default="bench-serve.json", show_default=True, metavar="OUT")
@quiet_option
def bench_serve(model_path, clients, seconds, steps, generate_share, mitigation, queue_size, json_out, quiet):
    """`memfree serve` under load: concurrent clients on 127.0.0.1 mixing checks and generations; requests served,
    p50/p95 latency per endpoint, errors by status, 5xx besides the queue's 503, requests lost, memory."""
    from memfree_bench.serve import format_summary, run_serve_bench
    res = run_serve_bench(model_path, clients, seconds, steps, generate_share, mitigation, queue_size,
                          progress=not quiet)
    write_json(json_out, res)
    click.echo(format_summary(res))
    click.echo(f"wrote {json_out}")


@bench.command("index")
@click.option("--vectors", default="1000000", show_default=True,
              help="Number of vectors, or several comma-separated (one build each).")
@click.option("--dim", default=512, show_default=True, type=click.IntRange(min=8))
@click.option("--nprobe", "nprobes", default="16,32,64", show_default=True, help="Comma-separated nprobe values.")
@click.option("--queries", default=300, show_default=True, type=click.IntRange(min=10))
@click.option("--memory-budget", default="4GB", show_default=True, help="The index's memory budget.")
@click.option("--work", default="bench-index-work", show_default=True, metavar="DIR",
              help="Scratch folder for the shards and the index (deleted after each size).")
@click.option("--embed-images", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also time the embedding stage on this many 256x256 JPEGs in a webdataset shard (pixel:64).")
@click.option("--json", "json_out", default="bench-index.json", show_default=True, metavar="OUT",
              help="Results; rows of other sizes already in it are kept.")
def bench_index(vectors, dim, nprobes, queries, memory_budget, work, embed_images, json_out):
    """The index at scale on synthetic clustered vectors: recall@10 against exact search, latency per query,
    build time and peak memory."""
    import json
    import platform
    from pathlib import Path
    from memfree.index_scale import parse_size
    from memfree_bench.index import run_bench
    from memfree_bench.index import embedding_throughput
    sizes = [int(float(v)) for v in vectors.split(",") if v.strip() and int(float(v)) > 0]
    probes = tuple(int(v) for v in nprobes.split(",") if v.strip())
    result = json.loads(Path(json_out).read_text()) if Path(json_out).exists() else {"rows": []}
    result.update({"benchmark": "memfree bench index", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"})
    if embed_images:
        result["embedding"] = embedding_throughput(embed_images, Path(work) / "embed")
        click.echo(f"embedding: {result['embedding']['images_per_s']} images/s ({result['embedding']})")
        write_json(json_out, result)
    for n in sizes:
        rows = run_bench(n, dim, Path(work) / str(n), probes, queries, parse_size(memory_budget))
        result["rows"] = [r for r in result["rows"] if (r["vectors"], r["dim"]) != (n, dim)] + rows
        write_json(json_out, result)
        for r in rows:
            click.echo(f"{r['vectors']:>10d} x {r['dim']}  nprobe {r['nprobe']}  recall@10 {r['recall_at_10']:.3f}  "
                       f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  build {r['build_seconds']} s "
                       f"({r['build_vectors_per_s']}/s)  peak {r['peak_memory_mb']} MB  {r['factory']}")
    click.echo(f"wrote {json_out}")
