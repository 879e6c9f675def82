"""What an extraction needs to know about a Hugging Face language-model folder, from its names and
its ``config.json`` alone (no model class is built):

* which weight is the input embedding (``[vocab, dim]``: peft adapts it with its own embedding
  layout, not ``lora_A``/``lora_B``), and which is the output head;
* whether the two are tied (``tie_word_embeddings``): then the head *is* the embedding, a change to
  one is a change to both, and only the embedding is extracted. peft merges its embedding LoRA into
  the shared weight once, so ``merge_and_unload`` gives base + ΔW exactly; unmerged, peft applies it
  to the lookup only and the head keeps the old weight. peft has no layout that is right both ways
  for a low-rank tied embedding (``ensure_weight_tying`` adds the same LoRA to the head, which the
  merge then applies twice; ``modules_to_save`` stores the whole embedding twice), so the
  merge-correct one is written;
* what peft's ``adapter_config.json`` should say so that ``AutoPeftModelFor…`` can load the adapter:
  ``task_type`` from the model class (``…ForCausalLM`` → ``CAUSAL_LM``) and ``base_model_name_or_path``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# last name of the input-embedding module in transformers' model classes (llama/qwen/mistral/gemma/phi,
# gpt2, bloom/falcon/bert, gpt-neox, internlm, t5)
EMBEDDING_NAMES = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared"})
HEAD_NAMES = ("lm_head", "embed_out")
# the model class's suffix -> peft's task type
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
              ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
              ("ForQuestionAnswering", "QUESTION_ANS"))
TASK_NAMES = tuple(sorted({t for _, t in TASK_TYPES} | {"FEATURE_EXTRACTION"}))


def is_embedding(path: str) -> bool:
    """Whether a module path (``model.embed_tokens``) names an input-embedding layer."""
    return path.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def embedding_path(paths: list[str]) -> str | None:
    """The input embedding among a model's module paths (the first one, in file order)."""
    return next((p for p in paths if is_embedding(p)), None)


def is_tied(config: Mapping[str, Any] | None) -> bool:
    """Whether an HF config ties the output head to the input embedding (transformers' default for a
    config without the key is to tie; no config: not an HF model folder, nothing to say)."""
    return config is not None and bool(config.get("tie_word_embeddings", True))


def tied_head(paths: list[str], config: Mapping[str, Any] | None) -> str | None:
    """The output head's module path when the config ties it to the input embedding (and the file
    stores it anyway), else None. transformers' default for a config without the key is to tie."""
    if not is_tied(config) or embedding_path(paths) is None:
        return None
    return next((p for p in paths if p in HEAD_NAMES), None)


def task_type(config: Mapping[str, Any] | None) -> str | None:
    """peft's task type for the model class the config names (None when it names none we know)."""
    archs = (config or {}).get("architectures") or []
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    if name.endswith("ForConditionalGeneration") and (config or {}).get("is_encoder_decoder"):
        return "SEQ_2_SEQ_LM"
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)


def peft_fields(base: str | os.PathLike[str], config: Mapping[str, Any] | None, *, task: str | None = None,
                name: str | None = None) -> dict[str, object]:
    """``adapter_config.json`` fields for an adapter of the model in folder ``base``: the task type
    (given, else from the config) and the base model (given, else the config's ``_name_or_path`` when
    it names a hub model, else ``base``'s absolute path, which ``from_pretrained`` loads as well)."""
    hub = (config or {}).get("_name_or_path")
    if not name:
        name = hub if isinstance(hub, str) and hub and not os.path.isabs(hub) and not os.path.exists(hub) \
            else os.path.abspath(os.fspath(base))
    return {"task_type": task or task_type(config), "base_model_name_or_path": name}
