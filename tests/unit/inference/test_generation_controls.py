"""Generation past the first end-of-text: `min_new_tokens` holds EOS back, `stop_at_eos=False`
goes on through it, and the memory plan sizes the KV cache for the request, not the model's
maximum context."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer

from ava.inference import GenerationError, load_model
from ava.inference.cli import parse_args
from ava.inference.generate import GenerationConfig, generate_tokens
from ava.inference.loader import DOCUMENT_BREAK, decode_documents

from .conftest import make_model

EOS, OTHER = 3, 7


def eos_loving_model():
    """A real nano model whose final hidden state is one constant vector for every token, with
    an untied head that scores EOS highest and token 7 second: greedy decoding always wants EOS."""
    model = make_model(tie_embeddings=False)
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.copy_(torch.linspace(-1, 1, model.cfg.hidden_size))
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS] = 10 * model.norm.bias
        model.lm_head.weight[OTHER] = 5 * model.norm.bias
    return model


def test_min_new_tokens_holds_eos_back_and_stop_at_eos_false_goes_through_it():
    model = eos_loving_model()
    prompt = [[11, 12]]
    assert generate_tokens(model, prompt, GenerationConfig(max_new_tokens=6), eos_id=EOS, pad_id=0) == [[]]
    held = generate_tokens(model, prompt, GenerationConfig(max_new_tokens=6, min_new_tokens=3), eos_id=EOS, pad_id=0)
    assert held == [[OTHER, OTHER, OTHER]]  # then EOS ends the row
    through = generate_tokens(model, prompt, GenerationConfig(max_new_tokens=6, min_new_tokens=2,
                                                                stop_at_eos=False), eos_id=EOS, pad_id=0)
    assert through == [[OTHER, OTHER, EOS, EOS, EOS, EOS]]


def test_eos_inside_generated_text_reads_as_a_document_break(tokenizer_file):
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eos = tokenizer.token_to_id("<|endoftext|>")
    a, b = tokenizer.encode("The quick fox").ids, tokenizer.encode("Pack my box").ids
    assert decode_documents(tokenizer, [*a, eos, *b], eos) == f"The quick fox{DOCUMENT_BREAK}Pack my box"
    assert decode_documents(tokenizer, a, eos) == "The quick fox"


def test_cli_flags_reach_the_generation_config():
    args = parse_args(["m", "--prompt", "x", "--min-new-tokens", "5", "--ignore-eos", "--stop", "END"])
    assert (args.min_new_tokens, args.ignore_eos, args.stop) == (5, True, ["END"])
    with pytest.raises(GenerationError, match=r"min_new_tokens=5 must be in \[0, max_new_tokens=4\]"):
        GenerationConfig(max_new_tokens=4, min_new_tokens=5)


def test_memory_plan_is_for_the_requested_context_not_the_models_maximum(ava_export, caplog):
    path, model = ava_export
    kv_per_token = 2 * model.cfg.num_layers * model.cfg.hidden_size * 4  # fp32 keys + values, all layers
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with caplog.at_level(logging.INFO, logger="ava.inference"):
        loaded = load_model(path, context_len=40, batch_size=2)
    planned = sum(loaded.plan.bytes_per_device.values())
    assert planned == weights + 40 * 2 * kv_per_token
    assert "the plan assumed a KV cache for 40 tokens x batch 2" in caplog.text
    assert f"the model allows {model.cfg.max_seq_len}" in caplog.text
    default = load_model(path)  # no context_len: the generation defaults' max_new_tokens
    assert sum(default.plan.bytes_per_device.values()) == weights + GenerationConfig().max_new_tokens * kv_per_token
