"""`init_from=` a directory `transformers` saved (Qwen3-MoE: GQA, per-head q/k norm, an explicit
head_dim, a dense layer), fine-tuned on conversations on 2 ranks: the architecture, weights,
tokenizer and chat template come from it although `experiment=smoke` picks nano; step 1's loss
(assistant tokens only, document-masked packing, the mean over the global batch's targets) is
what transformers computes on each conversation of the same first batches run alone; it trains,
resumes exactly, and `ava-export --layout auto` writes it back as a Qwen3-MoE that
`transformers` loads with Ava's logits and the same chat template. (The refusals, which stop
before any process group: tests/unit/hf/test_families.py.)"""

from __future__ import annotations

import json
import math
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
# transformers computes, so step 1's loss can be checked against it
RUN = ["deepspeed=zero2", "trainer.micro_batch_size=4", "trainer.max_steps=4", "trainer.save_every=2",
       "trainer.eval_every=2", "trainer.warmup_steps=1", "model.capacity_factor=null", "model.router_jitter=0.0",
       "data=ichat", "data.document_mask=true", "data.seq_len=128"]


@pytest.fixture(scope="module")
def qwen3_moe_dir(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "qwen3_moe"
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False, max_position_embeddings=128,
        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(path)
    texts = corpus.read_text().split("\n\n")
    tok = train_tokenizer([texts], cfg=TokenizerConfig(), vocab_size=512)
    save_atomic(tok, path / "tokenizer.json")
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
    assert f"init_from: weights of {qwen3_moe_dir} (qwen3_moe) loaded before step 0" in run.output
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
