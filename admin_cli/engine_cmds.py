"""``aziza-admin model pull|list|verify`` and ``aziza-admin bench engine`` (torch imported lazily)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click


def _models_dir() -> Path:
    from bridge.config import get_settings

    return get_settings().data_dir / "models"


@click.group()
def model() -> None:
    """Engine weights: download, list, verify."""


@model.command("pull")
@click.argument("repo")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--dir", "target", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Download into this directory instead of the Hugging Face cache.")
def pull(repo: str, revision: str | None, target: Path | None) -> None:
    """Download REPO (e.g. kyutai/moshiko-pytorch-bf16) with a progress bar; honours HF_ENDPOINT/HF_TOKEN."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from engine.moshi.loader import write_manifest

    try:
        path = Path(snapshot_download(repo, revision=revision, local_dir=target))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise click.ClickException(f"cannot download {repo}: {exc}") from None
    manifest = write_manifest(path)  # sizes and sha256 of what arrived: checked on every engine start
    click.echo(f"{repo} -> {path} (manifest {manifest.name})")


def _installed() -> list[tuple[str, Path, int]]:
    found: list[tuple[str, Path, int]] = []
    base = _models_dir()
    if base.is_dir():
        for d in sorted(base.iterdir()):
            weights = list(d.glob("*.safetensors"))
            if d.is_dir() and weights:
                found.append((d.name, d, sum(p.stat().st_size for p in d.iterdir() if p.is_file())))
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        # HF_HUB_CACHE read now, not at huggingface_hub's import (tests and operators may set it late).
        for repo in scan_cache_dir(os.environ.get("HF_HUB_CACHE") or None).repos:
            if repo.repo_type == "model" and any(
                    f.file_name.endswith(".safetensors") for rev in repo.revisions for f in rev.files):
                found.append((repo.repo_id, repo.repo_path, repo.size_on_disk))
    except CacheNotFound:
        pass
    return found


@model.command("list")
def list_models() -> None:
    """Models under data_dir/models and in the Hugging Face cache."""
    rows = _installed()
    if not rows:
        click.echo(f"no models (looked in {_models_dir()} and the Hugging Face cache)")
        return
    for name, path, size in rows:
        click.echo(f"{name:<40} {size / 2**30:8.2f} GiB  {path}")


@model.command("verify")
@click.argument("model_ref")
@click.option("--no-hash", is_flag=True, help="Skip sha256 checks (large checkpoints take a while).")
def verify(model_ref: str, no_hash: bool) -> None:
    """Check MODEL_REF (a directory or a cached repo id): every tensor present, right shapes, hashes."""
    from engine.moshi.loader import ModelError, verify_model

    try:
        report = verify_model(model_ref, check_hashes=not no_hash)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    for problem in report.problems:
        click.echo(f"FAIL {problem}", err=True)
    click.echo(f"{report.files.directory}: {report.tensors_checked} tensors, "
               f"{report.parameter_bytes / 2**20:.1f} MiB of weights, {report.files_hashed} files hashed: "
               f"{'OK' if report.ok else f'{len(report.problems)} problem(s)'}")
    if not report.ok:
        sys.exit(1)


def _slot_list(_ctx: click.Context, _param: click.Parameter, value: str) -> list[int]:
    try:
        slots = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 1,4,16") from None
    if not slots or min(slots) < 1:
        raise click.BadParameter("slot counts must be >= 1")
    return slots


def _choice_list(value: str, allowed: tuple[str, ...] | None, param: click.Parameter) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if (x not in allowed if allowed else not x.isdigit())]
    if not items or bad:
        what = f"from {', '.join(allowed)}" if allowed else "non-negative integers"
        raise click.BadParameter(f"comma-separated, {what}", param=param)
    return items


def _dtype_list(_ctx: click.Context, _param: click.Parameter, value: str) -> list[str]:
    from engine.moshi.bench import DTYPES

    names = [x.strip() for x in value.split(",") if x.strip()]
    bad = [n for n in names if n not in DTYPES]
    if not names or bad:
        raise click.BadParameter(f"comma-separated, from {', '.join(DTYPES)}")
    return names


@click.command("engine")
@click.option("--model", "model_ref", default="tiny", show_default=True,
              help="'tiny' (random weights, written to a temp dir), 'random:SHAPE' (moshi-7b, "
                   "personaplex-7b: random weights built in memory) or a weights directory.")
@click.option("--slots", default="1,4,16", show_default=True, callback=_slot_list)
@click.option("--dtype", "dtypes", default="fp32", show_default=True, callback=_dtype_list,
              help="Comma-separated: fp32, bf16, fp8 (FP8 temporal transformer).")
@click.option("--ticks", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Untimed ticks first (CUDA graphs are captured here).")
@click.option("--kv-dtype", "kv_dtypes", default="auto", show_default=True,
              callback=lambda c, p, v: _choice_list(v, ("auto", "fp8"), p),
              help="Comma-separated: auto (the compute dtype), fp8 (e4m3 KV cache).")
@click.option("--adapters", "adapter_counts", default="0", show_default=True,
              callback=lambda c, p, v: [int(x) for x in _choice_list(v, None, p)],
              help="Comma-separated counts of distinct rank-16 LoRA adapters in the batch (0 = none).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print {\"results\": [...], \"summary\": {...}}.")
def bench_engine(model_ref: str, slots: list[int], dtypes: list[str], kv_dtypes: list[str],
                 adapter_counts: list[int], ticks: int, warmup: int, device: str, as_json: bool) -> None:
    """Per-tick p50/p99 by batch size, dtype, KV dtype and adapters; real-time factor, memory, batching
    efficiency, adapter load and prefix-cache start times, FP8 KV token agreement."""
    from engine.moshi.bench import format_table, fp8_kv_agreement, run_bench, stderr_progress, summarize
    from engine.moshi.loader import ModelError

    try:
        results = run_bench(model_ref, slots, dtypes, ticks, warmup=warmup, device=device,
                            progress=stderr_progress, kv_dtypes=kv_dtypes, adapter_counts=adapter_counts)
        summary = summarize(results)
        if "fp8" in kv_dtypes:
            summary["fp8_kv_agreement"] = fp8_kv_agreement(model_ref, device)
    except (ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"results": [r.as_dict() for r in results], "summary": summary}))
    else:
        click.echo(format_table(results))
        click.echo(json.dumps(summary))


@click.group("engine")
def engine() -> None:
    """The model engine: self-test (and memory planning)."""


@engine.command("selftest")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--model", "model_ref", default="tiny", show_default=True,
              help="'tiny', 'random:SHAPE' or a weights directory.")
@click.option("--dtype", "dtypes", default=None, callback=lambda c, p, v: _dtype_list(c, p, v) if v else None,
              help="Comma-separated dtypes (default: fp32,fp8 on CPU; bf16,fp8 on CUDA).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (\"ok\" is the last key).")
def selftest(device: str, model_ref: str, dtypes: list[str] | None, as_json: bool) -> None:
    """Batched vs single-stream agreement, isolation and reset under CUDA graphs, finite idle slots."""
    from engine.moshi.selftest import run_selftest

    report = run_selftest(device=device, model=model_ref, dtypes=dtypes)
    if as_json:
        click.echo(json.dumps(report))
    else:
        for run in report["runs"]:
            if "error" in run:
                click.echo(f"{run['dtype']}: ERROR {run['error']}")
                continue
            for name, check in run["checks"].items():
                detail = {k: v for k, v in check.items() if k != "ok"}
                click.echo(f"{run['dtype']:>5} {name:<12} {'ok' if check['ok'] else 'FAIL'}  {detail}")
        click.echo(f"ok: {report['ok']}")
    if not report["ok"]:
        sys.exit(1)


@engine.command("plan")
@click.option("--gpu-memory", required=True,
              help="Device memory, e.g. 80GiB (H100), 141GB or 143771MiB (H200).")
@click.option("--shape", default=None,
              help="A named shape (moshi-7b, personaplex-7b, tiny) instead of --model.")
@click.option("--model", "model_ref", default=None,
              help="A weights directory or cached repo id (its config).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32", "fp8"]), default="bf16",
              show_default=True)
@click.option("--kv-dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32", "fp8"]), default="auto",
              show_default=True)
@click.option("--adapters", type=click.IntRange(min=0), default=None,
              help="Resident LoRA adapters (default: engine.max_adapters).")
@click.option("--json", "as_json", is_flag=True)
def plan(gpu_memory: str, shape: str | None, model_ref: str | None, dtype: str, kv_dtype: str,
         adapters: int | None, as_json: bool) -> None:
    """Bytes of weights, per-slot state, activations and fixed parts, and the slots that fit."""
    from engine.config import EngineConfigError, load_engine_config
    from engine.moshi.plan import parse_bytes, plan_memory

    try:
        device_bytes = parse_bytes(gpu_memory)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpu-memory") from None
    if (shape is None) == (model_ref is None):
        raise click.UsageError("give exactly one of --shape and --model")
    if shape is not None:
        from engine.moshi.shapes import get_shape

        try:
            named = get_shape(shape)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--shape") from None
        lm_config, mimi_config = named.lm_config, named.mimi_config
    else:
        from engine.moshi.loader import ModelError, model_files

        try:
            files = model_files(str(model_ref))
        except ModelError as exc:
            raise click.ClickException(str(exc)) from None
        lm_config, mimi_config = files.config, files.mimi_config
    try:
        settings = load_engine_config().engine
    except EngineConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        result = plan_memory(lm_config, mimi_config, device_bytes, dtype=dtype, kv_dtype=kv_dtype,
                             max_adapters=settings.max_adapters if adapters is None else adapters,
                             lora_max_rank=settings.lora_max_rank, lora_targets=settings.lora_targets,
                             max_prefixes=settings.max_prefixes,
                             reserve_bytes=settings.memory_reserve_mb << 20, max_top_k=settings.max_top_k,
                             lora_max_added=settings.lora_max_added_tokens)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    data = {"shape": shape, "model": model_ref, **result.as_dict()}
    if as_json:
        click.echo(json.dumps(data))
        return
    gib = 2**30
    click.echo(f"device {device_bytes / gib:.1f} GiB, dtype {result.dtype}, KV {result.kv_dtype}")
    for label, value in (("weights", result.weight_bytes), ("adapter pages", result.adapter_bytes),
                         ("prefix cache", result.prefix_cache_bytes), ("reserve", result.reserve_bytes)):
        click.echo(f"  {label:<22} {value / gib:9.3f} GiB")
    click.echo(f"  {'state per slot':<22} {result.state_bytes_per_slot / 2**20:9.1f} MiB "
               f"(KV {result.kv_bytes_per_slot / 2**20:.1f} MiB)")
    click.echo(f"  {'activations per slot':<22} {result.activation_bytes_per_slot / 2**20:9.1f} MiB "
               f"({result.graph_sets} CUDA-graph set(s) + eager)")
    click.echo(f"slots that fit: {result.slots}")
