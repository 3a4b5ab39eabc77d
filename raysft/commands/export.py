"""``raysft export SRC DEST [--merge]``: a consolidated Hugging Face model from a run.

SRC is a run directory (local or ``s3://``), its ``model/`` folder, or a checkpoint folder. DEST gets
``model.safetensors`` (gathered from ZeRO-3 shards when SRC holds them), the tokenizer with its chat
template, the generation config, and a model card with the composed config and the data stats.

NOTE: SmolLM3 ties its input and output embeddings; DeepSpeed's ``zero_to_fp32.py
--safe_serialization`` fails on tied weights ("Some tensors share memory"), so ZeRO-3 shards are
gathered with DeepSpeed's Python API and written with ``save_pretrained``, which handles the tie.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from huggingface_hub import HfApi
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from raysft.assets import load_chat_template
from raysft.config import from_plain
from raysft.storage import checkpoints as ckpts
from raysft.storage import files
from raysft.storage.rundir import RunDir, absolute
from raysft.train import model as models


class ExportError(SystemExit):
    """The source cannot be exported as given; the message says what to pass instead. A SystemExit,
    as it always was here: a script calling ``export()`` ends with the message."""


def resolve_source(src_uri: str) -> tuple[str, str | None, str | None]:
    """(folder holding the weights or adapter, its run directory if known, a note to print).

    A run directory exports its final model, or, when the run stopped before its final save, its
    newest complete checkpoint (and says so)."""
    src = absolute(src_uri).rstrip("/")
    if not files.exists(src):
        raise ExportError(f"{src_uri} does not exist: pass a run directory (<storage.path>/<run>), its model/ "
                          "folder or one of its checkpoint_* folders")
    if any(files.exists(files.join(src, RunDir.MODEL, f)) for f in ("config.json", "adapter_config.json")):
        return files.join(src, RunDir.MODEL), src, None
    if files.exists(files.join(src, RunDir.CONFIG)):
        choice = ckpts.latest_verified(src)
        for line in choice.lines():
            print(f"raysft export: {line}", flush=True)
        latest = choice.chosen
        if latest is None:
            raise ExportError(f"run {src_uri} has neither a final model nor a complete checkpoint: nothing to export")
        return latest.uri, src, (f"run {src_uri} has no final model (it stopped before its final save); exporting "
                                 f"its newest complete checkpoint {latest.uri} (step {latest.step})")
    parent = src.rsplit("/", 1)[0]
    if files.exists(files.join(parent, RunDir.CONFIG)):
        return src, parent, None
    return src, None, None


def export(src_uri: str, dest: str, *, merge: bool = False) -> Path:
    """Export into ``dest`` (created; must not hold files): written aside and moved into place at the
    end, so a failed export leaves nothing behind."""
    weights_uri, run_uri, note = resolve_source(src_uri)
    if note:
        print(f"raysft export: {note}", flush=True)
    out = Path(dest)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{dest} already holds files: pass an empty or new directory")
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        run_dir = None
        if run_uri is not None:
            run_dir = work / "run"
            for name in (RunDir.CONFIG, RunDir.DATA_STATS):
                if files.exists(files.join(run_uri, name)):
                    run_dir.mkdir(exist_ok=True)
                    (run_dir / name).write_bytes(files.read_bytes(files.join(run_uri, name)))
        src = files.download_dir(weights_uri, work / "weights")
        if any(src.glob("raysft_manifest_rank*.json")):  # a checkpoint, or a model saved by this raysft
            ok, why = ckpts.verify(src)
            if not ok:
                raise ExportError(f"{weights_uri} fails its check ({why}): it cannot be exported as it is — export "
                                  "another checkpoint of the run (checkpoint_* folder)")
        _export(src, run_dir, work / "out", merge=merge)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(work / "out"), str(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _export(src: Path, run_dir: Path | None, out: Path, *, merge: bool) -> None:
    cfg = from_plain(yaml.safe_load((run_dir / RunDir.CONFIG).read_text())) if run_dir and (run_dir / RunDir.CONFIG).exists() else None
    out.mkdir(parents=True)
    if (src / "adapter_config.json").exists():
        if not merge:
            raise ExportError(f"{src} holds a LoRA adapter: pass --merge to merge it into its base model")
        model = _merged(src, cfg)
    elif (src / "latest").exists():  # DeepSpeed ZeRO checkpoint: gather the shards
        model = _from_zero_checkpoint(src, cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(out, safe_serialization=True)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)

    tok_src = src if (src / "tokenizer_config.json").exists() else None
    if tok_src is None and cfg is not None:
        tok_src = models.tokenizer_path(cfg.model)
    if tok_src is not None:
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
        if cfg is not None and cfg.data.chat_template:  # ship the template the model was trained with
            tokenizer.chat_template = load_chat_template(cfg.data.chat_template)
        tokenizer.save_pretrained(out)
    (out / "README.md").write_text(_model_card(run_dir, cfg))


def _base_model(cfg):
    if cfg is None:
        raise SystemExit("cannot find the run's config.yaml next to the adapter, so the base model is unknown")
    return models.build_model(cfg.model, models.resolve_accel(cfg.model, bf16=False), seed=cfg.trainer.seed)


def _merged(adapter_dir: Path, cfg):
    # A random-initialised base is rebuilt bit-for-bit from the run's config and seed.
    return PeftModel.from_pretrained(_base_model(cfg), adapter_dir).merge_and_unload()


def _from_zero_checkpoint(ckpt: Path, cfg):
    # Imported on use: importing deepspeed picks and announces an accelerator, which a plain export does not need.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    model = _base_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"ZeRO checkpoint {ckpt} does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def _model_card(run_dir: Path | None, cfg) -> str:
    lines = ["---", "library_name: transformers", "tags: [raysft, sft]", "---", "", "# Fine-tuned with raysft", ""]
    if cfg is not None:
        lines += [f"Base: `{cfg.model.name_or_path}` ({cfg.model.init}); stage `{cfg.stage}`.", "",
                  "## Composed config", "", "```yaml", (run_dir / RunDir.CONFIG).read_text().rstrip(), "```", ""]
    if run_dir is not None and (run_dir / RunDir.DATA_STATS).exists():
        stats = json.loads((run_dir / RunDir.DATA_STATS).read_text())
        lines += ["## Data", "", "| source | rows kept | tokens | trained tokens |", "|---|---|---|---|"]
        lines += [f"| {n} | {s['kept']} | {s['tokens']} | {s['trained_tokens']} |" for n, s in stats["sources"].items()]
        lines += ["", f"Packing efficiency {stats['packing_efficiency']:.1%} at max_length {stats['max_length']}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="raysft export", description=__doc__.splitlines()[0])
    p.add_argument("src", help="run directory, its model/ folder, or a checkpoint (local or s3://)")
    p.add_argument("dest", help="output directory")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base model")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the export to this hub repo (needs HF_TOKEN)")
    args = p.parse_args(argv)
    try:
        out = export(args.src, args.dest, merge=args.merge)
    except ExportError as e:
        print(f"raysft: error: {e}", file=sys.stderr)
        return 2
    if args.push_to_hub:
        HfApi(token=os.environ.get("HF_TOKEN")).upload_folder(folder_path=str(out), repo_id=args.push_to_hub)
    print(f"raysft: exported to {out}")
    return 0
