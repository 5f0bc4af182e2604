"""The standalone HF model (hmoe_ds/hf) against the training model, on the same weights (single process, CPU).

The training model (:mod:`hmoe_ds.modeling`, DeepSpeed's MoE layer) and the
standalone model an export carries (:mod:`hmoe_ds.hf.modeling_hmoe`) share
every class but the MoE layer; these tests check that the two MoE layers
compute the same function (Top-K and Top-P routing, unequal experts, gated and
plain activations, dense layers between MoE layers, the capacity path), that
weight names map one to one through :mod:`hmoe_ds.naming`, and that cached
generation gives the tokens of a full recomputation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from hmoe_ds.hf import MODEL_FILES, configuration_hmoe, modeling_hmoe, source_files
from hmoe_ds.modeling import HMoEForCausalLM, debug_config
from hmoe_ds.naming import export_key, logical_key_from_export

CASES = {
    "top_k2": dict(moe={"routing": "top_k", "top_k": 2}),
    "top_k1_unrenormalized": dict(moe={"routing": "top_k", "top_k": 1, "renormalize_gates": False}),
    "top_p": dict(moe={"routing": "top_p", "top_p": 0.6}),
    "top_p_gelu_dense_layers_tied": dict(moe={"routing": "top_p", "top_p": 0.4, "activation": "gelu"},
                                         moe_layer_frequency=2, num_hidden_layers=4, tie_word_embeddings=True),
    "top_k_geglu_capacity": dict(moe={"routing": "top_k", "top_k": 2, "activation": "geglu",
                                      "capacity_factor": 1.0, "eval_capacity_factor": 0.5, "min_capacity": 1}),
    "shared_expert": dict(moe={"routing": "top_p", "top_p": 0.6, "shared_expert_size": 48}),
    "residual_deepspeed_gate": dict(moe={"routing": "top_k", "top_k": 2, "gate_convention": "deepspeed",
                                         "shared_expert_size": 48, "use_residual": True}),
}


def training_and_standalone(seed: int = 0, **overrides) -> tuple[HMoEForCausalLM, modeling_hmoe.HMoEForCausalLM]:
    """A randomly initialised training model and the standalone model holding the same weights (renamed)."""
    torch.manual_seed(seed)
    config = debug_config(**overrides)
    training = HMoEForCausalLM(config).eval()
    # Sharper routers than the initial near-uniform ones, so Top-K/Top-P choices differ between tokens.
    with torch.no_grad():
        for _, layer in training.moe_layers():
            layer.moe_core.gate.wg.weight.mul_(5.0)
    standalone = modeling_hmoe.HMoEForCausalLM(configuration_hmoe.HMoEConfig(**config.to_dict())).eval()
    state = {export_key(name): value for name, value in training.state_dict().items()}
    result = standalone.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return training, standalone


def random_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_standalone_model_computes_what_the_training_model_computes(case: str) -> None:
    training, standalone = training_and_standalone(**CASES[case])
    ids_BT = random_ids(3, 24)
    with torch.no_grad():
        want = training(ids_BT, labels=ids_BT)
        got = standalone(ids_BT, labels=ids_BT, output_router_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.lm_loss, rtol=1e-6, atol=1e-6)
    # The routing really is heterogeneous: tokens pick different numbers / sets of experts.
    per_token = [stats.experts_per_token for stats in want.routing_stats]
    if CASES[case]["moe"]["routing"] == "top_p":
        assert all(1.0 < n < 4.0 for n in per_token), per_token
    assert all(int((stats.assignments_per_expert > 0).sum()) >= 3 for stats in want.routing_stats)
    # The standalone router's logits are the training router's, layer by layer.
    blocks = [b.block_sparse_moe for b in standalone.model.layers if b.is_moe]
    assert len(got.router_logits) == len(blocks) == len(training.moe_layers())
    x_TD = torch.randn(5, 64)
    with torch.no_grad():
        for (_, layer), block, logits in zip(training.moe_layers(), blocks, got.router_logits):
            assert logits.shape == (3 * 24, 4) and logits.dtype == torch.float32
            torch.testing.assert_close(block.route(x_TD)[0], layer.moe_core.gate(x_TD), rtol=0, atol=0)


def test_left_padded_batch_gives_the_unpadded_logits() -> None:
    _, standalone = training_and_standalone(**CASES["top_p"])
    ids = random_ids(1, 10, seed=3)
    padded = torch.cat([torch.full((1, 3), 7), ids], dim=1)
    mask = torch.ones_like(padded)
    mask[:, :3] = 0
    with torch.no_grad():
        alone = standalone(ids).logits
        both = standalone(padded, attention_mask=mask).logits
    torch.testing.assert_close(both[:, 3:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["top_k2", "top_p", "top_p_gelu_dense_layers_tied"])
def test_cached_generation_gives_the_tokens_of_full_recomputation(case: str) -> None:
    training, standalone = training_and_standalone(**CASES[case])
    prompt = random_ids(2, 6, seed=4)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # one left-padded row
    lengths: list[int] = []
    hook = standalone.model.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    cached = standalone.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    hook.remove()
    assert lengths == [6] + [1] * 9, lengths  # the prompt once, then one new token per step: a KV cache
    full = standalone.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                               use_cache=False)
    assert cached.shape == (2, 16) and torch.equal(cached, full)
    # The training model (same blocks, DeepSpeed's MoE layer) generates the same tokens.
    assert torch.equal(training.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                         pad_token_id=0), cached)
    # Continuing a cache with several new tokens at once (a causal mask offset by the cache) is exact too.
    with torch.no_grad():
        first = standalone(cached[:, :8], attention_mask=torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1),
                           use_cache=True)
        rest = standalone(cached[:, 8:], attention_mask=torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1),
                          cache=first.cache, use_cache=True)
        whole = standalone(cached, attention_mask=torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1))
    torch.testing.assert_close(rest.logits, whole.logits[:, 8:], rtol=1e-5, atol=1e-5)


def test_weight_names_follow_the_mixtral_convention_and_map_both_ways() -> None:
    training, standalone = training_and_standalone(**CASES["top_p_gelu_dense_layers_tied"])
    names = set(standalone.state_dict())
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    assert {f"model.layers.1.block_sparse_moe.experts.{i}.{w}.weight" for i in range(4) for w in ("w1", "w2")} <= names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # a dense layer keeps LLaMA's names
    assert not any("deepspeed" in n for n in names)
    for name in training.state_dict():
        assert logical_key_from_export(export_key(name)) == name
        assert logical_key_from_export(name) == name  # exports in the old (logical) names load as they are
    # The standalone expert i of layer l has the width of logical expert i.
    widths = [e.w1.weight.shape[0] for e in standalone.model.layers[1].block_sparse_moe.experts]
    assert widths == [32, 64, 96, 128]
    # A shared expert and a Residual-MoE coefficient map too (DeepSpeed's names in training).
    training, standalone = training_and_standalone(**CASES["residual_deepspeed_gate"])
    names = set(standalone.state_dict())
    assert {"model.layers.0.block_sparse_moe.shared_expert.w1.weight",
            "model.layers.0.block_sparse_moe.residual_coefficient.bias"} <= names
    for name in training.state_dict():
        assert logical_key_from_export(export_key(name)) == name
        assert export_key(name) in names


def test_standalone_files_import_only_torch_transformers_and_the_standard_library() -> None:
    import sys

    assert [p.name for p in source_files()] == list(MODEL_FILES)
    for path in source_files():
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        third_party = {r for r in roots if r not in sys.stdlib_module_names}
        assert third_party <= {"torch", "transformers"}, (path.name, third_party)


def test_hmoe_from_pretrained_reads_both_weight_namings(tmp_path: Path) -> None:
    """hmoe-ds's own class loads a save in the Mixtral names and one in the DeepSpeed (logical) names."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    training, _ = training_and_standalone(**CASES["top_k2"])
    with torch.no_grad():  # not the seeded initial values, which loading would re-draw for a missing expert
        for param in training.parameters():
            param.add_(0.01 * torch.randn_like(param))
    training.save_pretrained(tmp_path / "old")  # DeepSpeed-style names, as exports were written before
    new = tmp_path / "new"
    training.save_pretrained(new)
    state = {export_key(k): v.contiguous() for k, v in training.state_dict().items()}
    save_file(state, str(new / "model.safetensors"), metadata={"format": "pt"})
    ids = random_ids(2, 12)
    with torch.no_grad():
        want = training(ids).logits
    for directory in (tmp_path / "old", new):
        loaded, info = AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True)
        assert type(loaded) is HMoEForCausalLM
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)


def test_standalone_model_in_bfloat16_follows_fp32() -> None:
    """bf16 weights (as ``from_pretrained(..., dtype=torch.bfloat16)`` gives): fp32 router, fp32 expert sum."""
    _, standalone = training_and_standalone(**CASES["top_p"])
    ids = random_ids(2, 16)
    with torch.no_grad():
        want = standalone(ids).logits
        half = standalone.to(torch.bfloat16)
        got = half(ids).logits
        logits_TE, _, _ = half.model.layers[0].block_sparse_moe.route(torch.randn(3, 64, dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16 and logits_TE.dtype == torch.float32
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
    assert half.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)


def test_layers_the_standalone_model_cannot_compute_are_refused_by_name():
    with pytest.raises(ValueError, match="drop_tokens=False"):
        configuration_hmoe.HMoEConfig(moe={"expert_sizes": [8, 16], "routing": "top_k", "top_k": 1,
                                           "gate_convention": "deepspeed", "capacity_factor": 1.0})
    with pytest.raises(ValueError, match="top2_2nd_expert_sampling false"):
        configuration_hmoe.HMoEConfig(moe={"expert_sizes": [8, 16], "routing": "top_k", "top_k": 2,
                                           "gate_convention": "deepspeed", "top2_2nd_expert_sampling": True})
