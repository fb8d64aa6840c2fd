"""``aziza-admin train demo``: the whole pipeline on a tiny random-weight model, on CPU, in about a minute.

espeak-ng speaks Russian and Uzbek (Latin and Cyrillic) sentences -> a manifest -> tokenizer extension ->
dataset -> ~30 LoRA steps (validation loss before and after) -> adapter export -> the engine's MoshiBackend
loads it for a persona and its tokens change -> WER evaluation with the closed-set template judge.

The model is random, so what it says is noise and the WER is what a closed-set judge gives noise (bad);
the demo shows that every stage is real and measured, not that the targets are met.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

SENTENCES: dict[str, list[str]] = {
    "ru": [
        "Здравствуйте, чем могу вам помочь?",
        "Ваша запись подтверждена на вторник.",
        "Пожалуйста, назовите вашу фамилию.",
        "Офис открыт с девяти утра до шести вечера.",
        "Спасибо за звонок, хорошего дня.",
        "Минуточку, я проверю информацию.",
        "Доктор примет вас завтра в десять часов.",
        "Извините, линия сейчас занята.",
        "Повторите, пожалуйста, номер телефона.",  # val
        "Ваш заказ будет доставлен в пятницу.",  # val
    ],
    "uz": [
        "Assalomu alaykum, sizga qanday yordam bera olaman?",
        "Qabulingiz seshanba kuniga tasdiqlandi.",
        "Iltimos, familiyangizni ayting.",
        "Ofis ertalab soat to'qqizdan ochiq.",
        "Бир дақиқа, маълумотни текшириб кўраман.",
        "Шифокор сизни эртага соат ўнда қабул қилади.",
        "Кечирасиз, линия ҳозир банд.",
        "Телефон рақамингизни қайтаринг, илтимос.",
        "Qo'ng'iroq uchun rahmat, kuningiz xayrli o'tsin.",  # val (Latin)
        "Буюртмангиз жума куни етказилади.",  # val (Cyrillic)
    ],
}
VAL_PER_LANGUAGE = 2
# base-spellable: the same ids with and without the extension (the LoRA-only engine check uses the base's)
PERSONA_PROMPT = "You answer the phone for a clinic."
TRAILING_SILENCE_S = 0.6


class DemoError(RuntimeError):
    pass


def synthesize(text: str, language: str, path: Path, speed: int = 150) -> None:
    """espeak-ng to a WAV (22.05 kHz mono), plus trailing silence like a real turn's pause."""
    import soundfile

    if shutil.which("espeak-ng") is None:
        raise DemoError("espeak-ng is not installed (apt-get install espeak-ng)")
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", language, "-s", str(speed), "-w", str(raw), text], check=True,
                   capture_output=True, timeout=60)
    data, rate = soundfile.read(str(raw), dtype="float32")
    raw.unlink()
    data = np.concatenate([data, np.zeros(int(TRAILING_SILENCE_S * rate), dtype=np.float32)])
    soundfile.write(str(path), data, rate, subtype="PCM_16")


def write_corpus(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for language, sentences in SENTENCES.items():
        for i, text in enumerate(sentences):
            name = f"{language}-{i:02d}"
            synthesize(text, language, data_dir / f"{name}.wav")
            split = "val" if i >= len(sentences) - VAL_PER_LANGUAGE else "train"
            rows.append({"id": name, "audio": f"{name}.wav", "language": language, "transcript": text,
                         "role": "agent", "split": split})
    manifest = data_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return manifest


def demo_config(out: Path, steps: int) -> Path:
    """The demo's train_config.yaml: the documented format, tiny-model values."""
    import yaml

    config = {
        "model": "model", "run_dir": "run", "seed": 1234,
        "data": {"manifest": "data/manifest.jsonl", "languages": ["ru", "uz"],
                 "persona_prompt": PERSONA_PROMPT, "aligner": "uniform", "max_seconds": 20.0,
                 "shard_samples": 8},
        "tokenizer": {"extend": True, "new_pieces": 400},
        "lora": {"rank": 8, "alpha": 16},
        "train": {"device": "cpu", "lr": 3e-3, "warmup_steps": 3, "batch_size": 4, "max_steps": steps,
                  "eval_every": 5, "checkpoint_every": 10, "keep_checkpoints": 2,
                  "gradient_checkpointing": True, "embedding_lr_scale": 3.0},
        "eval": {"judge": "template", "max_samples": 4},
    }
    path = out / "train_config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    return path


def run_demo(out: Path, steps: int = 30, log: Any = None) -> dict[str, Any]:
    """Every stage on a tiny model under ``out`` (created); returns the JSON summary."""
    from engine.moshi.lora import AdapterError, read_adapter
    from engine.moshi.tiny import write_tiny_model
    from training import pipeline
    from training.config import load_config
    from training.dataset import load_split

    def say(msg: str) -> None:
        if log:
            log(msg)

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_tiny_model(out / "model", seed=7)
    manifest = write_corpus(out / "data")
    timings["model_and_speech_s"] = time.perf_counter() - t0
    config = load_config(demo_config(out, steps))
    say(f"corpus: {manifest}")

    vocab, timings["tokenizer_s"] = pipeline.timed(lambda: pipeline.learn_tokenizer(config))
    assert vocab is not None
    say(f"tokenizer: +{vocab.added} pieces {vocab.by_script}")
    report, timings["dataset_s"] = pipeline.timed(lambda: pipeline.build_dataset(config, progress=False))
    say(f"dataset: {report.counts} skipped {report.skipped}")
    result, timings["train_s"] = pipeline.timed(lambda: pipeline.train(config, log=say))

    adapter = pipeline.export(config, out / "adapter")
    lora_only = pipeline.export(config, out / "adapter-lora", lora_only=True)
    try:  # an engine without vocabulary-extension support would refuse it: then check the LoRA part
        read_adapter(adapter, "full")
        engine_refusal = None
    except AdapterError as exc:
        engine_refusal = str(exc)
    val = load_split(config.dataset_path, "val")
    check, timings["engine_check_s"] = pipeline.timed(
        lambda: pipeline.engine_check(config, lora_only if engine_refusal else adapter, val[0]))
    say(f"engine: adapter loaded in {check.adapter_load_ms:.1f} ms, "
        f"{check.tokens_changed}/{check.tokens_total} tokens changed")
    evaluation, timings["eval_s"] = pipeline.timed(lambda: pipeline.evaluate_run(config, adapter))
    langs = evaluation["languages"]
    timings["total_s"] = time.perf_counter() - t_all
    return {
        "val_loss_first": result.val_loss_first,
        "val_loss_last": result.val_loss_last,
        "val_loss_best": result.best_val_loss,
        "best_step": result.best_step,
        "steps": result.steps,
        "adapter_path": str(adapter),
        "adapter_lora_only_path": str(lora_only),
        "engine_adapter": str(lora_only if engine_refusal else adapter),
        "engine_refuses_extension": engine_refusal,
        "adapter_load_ms": check.adapter_load_ms,
        "tokens_changed": check.tokens_changed,
        "tokens_compared": check.tokens_total,
        "engine_warnings": check.warnings,
        "wer": {lang: r["wer"] for lang, r in langs.items()},
        "cer": {lang: r["cer"] for lang, r in langs.items()},
        "wer_target": {lang: r["target"] for lang, r in langs.items()},
        "wer_passed": {lang: r["passed"] for lang, r in langs.items()},
        "judge": next(iter(langs.values()))["judge"] if langs else None,
        "judge_floor_wer": {lang: r["judge_floor_wer"] for lang, r in langs.items()},
        "vocab": {"base": vocab.base, "added": vocab.added, "by_script": vocab.by_script},
        "dataset": {"counts": report.counts, "skipped": report.skipped, "frames": report.frames},
        "report": str(config.run_path / "eval" / "report.json"),
        "timings": timings,
    }
