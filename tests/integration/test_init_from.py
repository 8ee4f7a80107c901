"""`init_from=` directories `transformers` saved, on 2 ranks.

A Qwen3-MoE (GQA, per-head q/k norm, an explicit head_dim, a dense layer) fine-tuned on
conversations with expert parallelism (ep=2, ZeRO-2): the architecture, weights, tokenizer and
chat template come from it although `experiment=smoke` picks nano; step 1's loss (assistant
tokens only, document-masked packing, the mean over the global batch's targets) is what
transformers computes on each conversation of the same first batches run alone; it trains,
resumes exactly, and `ava-export --layout auto` writes it back as a Qwen3-MoE that
`transformers` loads with Ava's logits and the same chat template.

A Llama saved in bf16 over several shards, upcycled to 4 experts under ZeRO-3: the weights go
into the partitions module by module (the log says how much of the model a rank holds), and
step 1's loss is the dense model's on the same batches. (The refusals, which stop before any
process group: tests/unit/hf/test_families.py.)"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from ava.config import DataConfig, TokenizerConfig
from ava.data.chat import DEFAULT_TEMPLATE
from ava.data.loader import BlockLoader
from ava.data.prepare import prepare_data
from ava.data.tokenizer import save_atomic, train_tokenizer
from ava.files import sha256_file

transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")

# dropless and jitter-free (training-only settings, still the run's to choose): the function
# transformers computes, so step 1's loss can be checked against it (and the one AutoEP's
# expert-parallel layer computes)
RUN = ["deepspeed=zero2", "trainer.expert_parallel_size=2", "trainer.micro_batch_size=4", "trainer.max_steps=4",
       "trainer.save_every=2", "trainer.eval_every=2", "trainer.warmup_steps=1", "model.capacity_factor=null",
       "model.router_jitter=0.0", "data=ichat", "data.document_mask=true", "data.seq_len=128"]


# what both checkpoints share: GQA (2 kv heads of 4), untied embeddings, no special-token ids
# (Ava falls back to the tokenizer's <|endoftext|>)
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              tie_word_embeddings=False, max_position_embeddings=128, eos_token_id=None, bos_token_id=None,
              pad_token_id=None)


def _saved(root, corpus, family: str, dtype=torch.float32, max_shard_size="5GB", **config):
    """A random transformers `family` model (`Qwen3Moe`, `Llama`) of COMMON + `config`, as
    `save_pretrained` writes it in `dtype`, with a tokenizer.json trained on the corpus."""
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**COMMON, **config))
    path = root / family.lower()
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    save_atomic(train_tokenizer([corpus.read_text().split("\n\n")], cfg=TokenizerConfig(), vocab_size=512),
                path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def qwen3_moe_dir(corpus, tmp_path_factory):
    path = _saved(tmp_path_factory.mktemp("hf"), corpus, "Qwen3Moe", moe_intermediate_size=32, num_hidden_layers=3,
                  head_dim=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": DEFAULT_TEMPLATE}))
    return path


@pytest.mark.slow
def test_fine_tuning_a_transformers_checkpoint_on_chats_and_exporting_back_to_its_family(trainer, qwen3_moe_dir,
                                                                                        tmp_path):
    from ava.export import export_checkpoint
    from ava.inference import load_model

    overrides = [*RUN, f"init_from='{qwen3_moe_dir}'"]
    run = trainer.run(tmp_path / "run", overrides).check()
    assert f"init_from: weights of {qwen3_moe_dir} (qwen3_moe) loaded before step 0, whole on every rank" in run.output
    assert "expert parallel (autoep): ep=2, rank 0 holds experts [0, 4) of 8 in each of 2 layers" in run.output
    assert f"chat template from {qwen3_moe_dir / 'tokenizer_config.json'}" in run.output
    assert "skipped no_assistant: 1" in run.output and "skipped unknown_role: 1" in run.output
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert losses[4] < losses[1]
    # resume from step 2: steps 3 and 4 again, bit-identical
    checkpoints = run.run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000002")
    resumed = trainer.run(run.run_dir, overrides).check()
    assert "resuming from step_00000002 at step 2" in resumed.output
    assert {s: resumed.losses()[s] for s in (3, 4)} == {s: losses[s] for s in (3, 4)}
    # nano would be 2 layers of 4 experts: the checkpoint's 3 layers (one dense) of 8 are what trained
    records = [r for r in run.metrics() if "moe/layer2/gini" in r]
    assert records and not any("moe/layer1/gini" in r for r in run.metrics())

    out = export_checkpoint(run.run_dir, tmp_path / "export", progress=lambda _m: None)
    recorded = OmegaConf.load(out / "training_config.yaml")
    assert OmegaConf.to_container(recorded.source) == {
        "path": str(qwen3_moe_dir.resolve()), "family": "qwen3_moe", "file": "model.safetensors",
        "sha256": sha256_file(qwen3_moe_dir / "model.safetensors")}
    assert recorded.model.num_layers == 3 and recorded.data.tokenizer.path == str(qwen3_moe_dir / "tokenizer.json")
    # step 1 trained on each rank's first micro-batch: transformers' loss summed over every
    # conversation of those batches, each run alone, over the number of targets of both ranks
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), recorded.data))
    blocks = prepare_data(data_cfg, model_vocab_size=512, seed=recorded.seed, progress=False).train
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen3_moe_dir).eval()
    total, targets, documents = 0.0, 0, 0
    with torch.no_grad():
        for rank in (0, 1):
            batch = next(BlockLoader(blocks, micro_batch_size=4, rank=rank, world_size=2, seed=recorded.seed,
                                     document_mask=True))
            for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["document_ids"], strict=True):
                for doc in docs.unique():
                    alone = docs == doc
                    logits = hf(ids[alone][None]).logits[0]
                    total += torch.nn.functional.cross_entropy(logits, labels[alone], ignore_index=-100,
                                                               reduction="sum").item()
                    targets += int((labels[alone] != -100).sum())
                    documents += 1
    assert documents > 8  # several conversations per block: the packing and the mask were exercised
    lm_loss_step1 = next(r["train/lm_loss"] for r in run.metrics() if r.get("step") == 1 and "train/lm_loss" in r)
    assert lm_loss_step1 == pytest.approx(total / targets, rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["head_dim"], config["mlp_only_layers"]) == ("qwen3_moe", 24, [1])
    ours = load_model(out).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    chat = [{"role": "user", "content": "A bird walks."}, {"role": "assistant", "content": "The city opens."}]
    assert transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False) == \
        "<|im_start|>user\nA bird walks.<|im_end|>\n<|im_start|>assistant\nThe city opens.<|im_end|>\n"


@pytest.fixture(scope="module")
def llama_dir(corpus, tmp_path_factory):
    """A dense Llama saved by transformers in bf16, in shards of at most 100 kB."""
    return _saved(tmp_path_factory.mktemp("hf"), corpus, "Llama", torch.bfloat16, "100KB", num_hidden_layers=2,
                  initializer_range=0.1)


def _hf_loss(hf, blocks, seed: int) -> float:
    """transformers' mean loss over the targets of both ranks' first micro-batch of 4."""
    total, targets = 0.0, 0
    with torch.no_grad():
        for rank in (0, 1):
            batch = next(BlockLoader(blocks, micro_batch_size=4, rank=rank, world_size=2, seed=seed))
            logits = hf(batch["input_ids"]).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            targets += int((batch["labels"] != -100).sum())
    return total / targets


@pytest.mark.slow
def test_upcycling_a_sharded_bf16_llama_into_zero3_partitions_keeps_the_dense_loss(trainer, llama_dir, tmp_path):
    from ava.config import AvaConfig, to_object
    from ava.train.init_from import apply_source, open_source

    run = trainer.run(tmp_path / "run", [
        "deepspeed=zero3", f"init_from='{llama_dir}'", "upcycle.num_experts=4", "upcycle.top_k=2",
        "model.capacity_factor=null", "model.router_jitter=0.0", "trainer.micro_batch_size=4", "trainer.max_steps=1",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.save_at_end=false"]).check()
    held = re.search(rf"init_from: weights of {re.escape(str(llama_dir))} \(llama\) loaded before step 0, into the "
                     r"ZeRO-3 partitions, module by module \(this rank holds ([\d,]+) of ([\d,]+) values\)", run.output)
    assert held, run.output[-3000:]
    values, total = (int(g.replace(",", "")) for g in held.groups())
    assert "stored bfloat16 weights become float32 master weights for training" in run.output
    # the run's own config, as the run applied the checkpoint to it: the same data and tokenizer
    recorded = OmegaConf.merge(OmegaConf.structured(AvaConfig), OmegaConf.load(run.run_dir / ".hydra" / "config.yaml"))
    cfg = apply_source(to_object(recorded), open_source(str(llama_dir)), [])
    blocks = prepare_data(cfg.data, model_vocab_size=512, seed=cfg.seed, progress=False).train
    dense = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    # the whole upcycled model (each MLP now 4 experts, a router per layer); rank 0 holds half
    # of it (+ padding), where a model built whole and partitioned later would hold all of it
    mlp, routers = 2 * 3 * 64 * 96, 2 * 4 * 64
    assert total == sum(p.numel() for p in dense.parameters()) + 3 * mlp + routers
    assert total / 2 <= values < 0.51 * total
    lm_loss_step1 = next(r["train/lm_loss"] for r in run.metrics() if r.get("step") == 1 and "train/lm_loss" in r)
    assert lm_loss_step1 == pytest.approx(_hf_loss(dense, blocks, cfg.seed), rel=1e-5)
