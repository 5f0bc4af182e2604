"""Tests for hmoe_ds.modeling: the HF-compatible HMoE causal LM (single process, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from deepspeed.moe.utils import is_moe_param
from transformers import AutoConfig, AutoModelForCausalLM

from hmoe_ds.config import HMoELayerConfig
from hmoe_ds.modeling import (
    HMoECausalLMOutput,
    HMoEConfig,
    HMoEForCausalLM,
    debug_config,
    parameter_summary,
)

LOSS_NAMES = {"load_balance", "p_penalty", "entropy", "z_loss"}


def make_model(seed: int = 0, **overrides) -> HMoEForCausalLM:
    torch.manual_seed(seed)
    return HMoEForCausalLM(debug_config(**overrides))


def random_ids(batch: int = 2, seq: int = 16, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- forward


def test_forward_shapes_and_outputs():
    model = make_model().eval()
    ids_BT = random_ids(2, 16)
    out = model(ids_BT, labels=ids_BT)
    assert isinstance(out, HMoECausalLMOutput)
    assert out.logits.shape == (2, 16, 512)
    for name in ("loss", "lm_loss", "aux_loss"):
        assert getattr(out, name).shape == () and torch.isfinite(getattr(out, name))
    assert set(out.aux_losses) == LOSS_NAMES
    assert len(out.routing_stats) == 2
    assert all(s.num_tokens == 32 for s in out.routing_stats)
    # An untrained model predicts roughly uniformly over the vocabulary.
    assert abs(out.lm_loss.item() - math.log(512)) < 0.5

    no_labels = model(ids_BT)
    assert no_labels.loss is None and no_labels.lm_loss is None
    torch.testing.assert_close(no_labels.logits, out.logits)
    as_tuple = model(ids_BT, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], out.logits)  # (aux_loss, logits, aux_losses, routing_stats)


def test_lm_loss_is_shifted_cross_entropy_with_ignore_index():
    model = make_model().eval()
    ids_BT = random_ids(2, 12)
    labels_BT = ids_BT.clone()
    labels_BT[0, 5:] = -100
    out = model(ids_BT, labels=labels_BT)
    logits = out.logits[:, :-1].reshape(-1, 512)
    targets = labels_BT[:, 1:].reshape(-1)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.lm_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("frequency", [1, 2])
def test_causal_masking(kv_heads, frequency):
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    model = make_model(num_key_value_heads=kv_heads, moe_layer_frequency=frequency).eval()
    ids_BT = random_ids(2, 16)
    t = 7
    changed_BT = ids_BT.clone()
    changed_BT[:, t + 1 :] = random_ids(2, 16 - t - 1, seed=99)
    assert not torch.equal(changed_BT, ids_BT)
    with torch.no_grad():
        logits_a = model(ids_BT).logits
        logits_b = model(changed_BT).logits
    torch.testing.assert_close(logits_a[:, : t + 1], logits_b[:, : t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(logits_a[:, t + 1 :], logits_b[:, t + 1 :])  # the test can fail


def test_left_padding_matches_unpadded_sequence():
    """With an attention mask, a left-padded row gives the same logits as the row alone."""
    model = make_model().eval()
    short_T = random_ids(1, 6, seed=3)
    long_T = random_ids(1, 9, seed=4)
    pad = 0
    batch_BT = torch.cat([torch.cat([torch.full((1, 3), pad), short_T], dim=1), long_T])
    mask_BT = torch.ones_like(batch_BT)
    mask_BT[0, :3] = 0
    with torch.no_grad():
        padded = model(batch_BT, attention_mask=mask_BT).logits
        alone_short = model(short_T).logits
        alone_long = model(long_T).logits
        all_ones = model(long_T, attention_mask=torch.ones_like(long_T)).logits
    torch.testing.assert_close(padded[0, 3:], alone_short[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[1], alone_long[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(all_ones, alone_long)
    assert torch.isfinite(padded).all()


# --------------------------------------------------------------------------- training


def test_loss_goes_down_on_a_repeated_batch():
    model = make_model().train()
    ids_BT = random_ids(4, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(ids_BT, labels=ids_BT)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[0] > 5.5
    assert losses[-1] < 0.5 * losses[0], losses


def test_aux_loss_is_sum_of_layer_l_aux_and_reaches_the_router():
    model = make_model(num_hidden_layers=3).train()
    captured = {}
    for idx, layer in model.moe_layers():
        layer.register_forward_hook(lambda mod, args, output, idx=idx: captured.__setitem__(idx, output[1]))
    ids_BT = random_ids(2, 16)
    out = model(ids_BT, labels=ids_BT)
    assert sorted(captured) == [0, 1, 2]
    torch.testing.assert_close(out.aux_loss, sum(captured.values()))
    assert out.aux_loss.item() > 0
    # routing_stats: one per MoE layer, in layer order, each that layer's own (its sizes, this batch's tokens).
    assert len(out.routing_stats) == 3
    for (_, layer), s in zip(model.moe_layers(), out.routing_stats):
        assert s.expert_sizes == tuple(layer.expert_sizes) and s.num_tokens == ids_BT.numel()
        assert int(s.assignments_per_expert.sum()) == int(s.selected_per_expert.sum()) - s.dropped_assignments
    for name in LOSS_NAMES:
        mean = sum(s.losses[name] for s in out.routing_stats) / 3
        assert out.aux_losses[name].item() == pytest.approx(mean, rel=1e-5)
        assert not out.aux_losses[name].requires_grad
    # The aux loss alone must produce router gradients (it is not detached on the way out).
    out.aux_loss.backward()
    for _, layer in model.moe_layers():
        grad = layer.deepspeed_moe.gate.wg.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids_BT = random_ids(2, 16)
    reference = make_model().train()
    checkpointed = make_model().train()
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.model.gradient_checkpointing
    results = []
    for model in (reference, checkpointed):
        out = model(ids_BT, labels=ids_BT)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)


# --------------------------------------------------------------------------- MoE placement


@pytest.mark.parametrize(
    "frequency, expected",
    [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), (4, [3]), (0, [])],
)
def test_moe_layer_frequency_places_moe_layers(frequency, expected):
    config = debug_config(num_hidden_layers=4, moe_layer_frequency=frequency)
    assert [i for i in range(4) if config.is_moe_layer(i)] == expected
    model = HMoEForCausalLM(config).eval()
    assert [i for i, _ in model.moe_layers()] == expected
    for i, block in enumerate(model.model.layers):
        assert hasattr(block.mlp, "deepspeed_moe") == (i in expected)
    ids_BT = random_ids(2, 8)
    out = model(ids_BT, labels=ids_BT)
    assert len(out.routing_stats) == len(expected)
    if not expected:
        assert out.aux_loss.item() == 0.0 and out.aux_losses == {}
        torch.testing.assert_close(out.loss, out.lm_loss)


# --------------------------------------------------------------------------- HF integration


def test_autoconfig_round_trip(tmp_path):
    config = debug_config(moe={"routing": "top_k", "top_k": 2}, tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is HMoEConfig and loaded.model_type == "hmoe"
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "moe_layer_frequency", "dense_intermediate_size", "tie_word_embeddings", "moe", "rope_theta"):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.moe_layer_config() == config.moe_layer_config()
    assert isinstance(loaded.moe_layer_config(), HMoELayerConfig)
    assert loaded.moe_layer_config().routing == "top_k"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_pretrained_from_pretrained_round_trip(tmp_path, tie):
    model = make_model(tie_word_embeddings=tie).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    ids_BT = random_ids(2, 16)
    with torch.no_grad():
        expected = model(ids_BT, labels=ids_BT)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HMoEForCausalLM
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    with torch.no_grad():
        got = loaded(ids_BT, labels=ids_BT)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    # DeepSpeed must still see the experts as expert parameters after loading.
    tagged = lambda m: sorted(n for n, p in m.named_parameters() if is_moe_param(p))  # noqa: E731
    assert tagged(loaded) == tagged(model) and len(tagged(model)) == 2 * 4 * 3


def test_generate_greedy_is_deterministic_and_matches_a_manual_loop():
    model = make_model().eval()
    prompt_BT = random_ids(2, 5)
    new = 7
    first = model.generate(prompt_BT, max_new_tokens=new, do_sample=False)
    second = model.generate(prompt_BT, max_new_tokens=new, do_sample=False)
    assert first.shape == (2, 5 + new)
    assert torch.equal(first, second)
    assert torch.equal(first[:, :5], prompt_BT)
    ids_BT = prompt_BT
    with torch.no_grad():
        for _ in range(new):
            next_B = model(ids_BT).logits[:, -1].argmax(-1)
            ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
    assert torch.equal(first, ids_BT)


def test_generate_with_left_padding_matches_unpadded():
    model = make_model().eval()
    prompt = random_ids(1, 4, seed=5)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], dim=1)
    batch = torch.cat([padded, random_ids(1, 6, seed=6)])
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[0, 2:], alone[0])


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_size=66), r"hidden_size=66 must be divisible by num_attention_heads=4"),
        (dict(num_key_value_heads=3), r"num_key_value_heads=3 must divide num_attention_heads=4"),
        (dict(vocab_size=0), r"vocab_size=0: must be a positive int"),
        (dict(num_hidden_layers=-1), r"num_hidden_layers=-1: must be a positive int"),
        (dict(dense_intermediate_size=1.5), r"dense_intermediate_size=1.5: must be a positive int"),
        (dict(rms_norm_eps=0.0), r"rms_norm_eps=0.0: must be a positive number"),
        (dict(hidden_size=12, num_attention_heads=4, num_key_value_heads=None), r"must be even"),
        (dict(moe_layer_frequency=-1), r"moe_layer_frequency=-1: allowed values are 0 .* 1..num_hidden_layers=2"),
        (dict(moe_layer_frequency=3), r"moe_layer_frequency=3"),
        (dict(moe={"top_p": 1.5}), r"moe: top_p=1.5: must be a number in \(0, 1\]"),
        (dict(moe={"routing": "top_q"}), r"moe: routing='top_q' is not supported; allowed values: 'top_k', 'top_p'"),
        (dict(moe={"expert_sizes": []}), r"moe: expert_sizes"),
        (dict(moe={"ep_size": 3}), r"moe: ep_size=3"),
        (dict(moe={"num_experts": 4}), r"moe: unknown MoE layer option"),
        (dict(moe=[32, 64]), r"moe=\[32, 64\]: must be a dict"),
    ],
)
def test_config_validation_errors(overrides, match):
    if isinstance(overrides.get("moe"), list):
        with pytest.raises(ValueError, match=match):
            HMoEConfig(**overrides)
        return
    with pytest.raises(ValueError, match=match):
        debug_config(**overrides)


def test_config_defaults_and_helpers():
    config = HMoEConfig()
    assert config.num_key_value_heads == config.num_attention_heads  # None means MHA
    assert config.moe["expert_sizes"] == [864, 1056, 1248, 1440, 1632, 1824, 2016, 2208]
    assert sum(config.moe["expert_sizes"]) == 12288  # the paper's 0.4B HMoE
    layer_cfg = config.moe_layer_config()
    assert layer_cfg.routing == "top_p" and layer_cfg.top_p == 0.6 and layer_cfg.p_penalty_coef == 0.1
    assert layer_cfg is not config.moe_layer_config()  # a fresh copy each call
    dense = debug_config(moe_layer_frequency=0)
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))


# --------------------------------------------------------------------------- parameter accounting


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(tie_word_embeddings=True),
        dict(moe_layer_frequency=2, num_hidden_layers=4),
        dict(moe_layer_frequency=0),
        dict(moe={"routing": "top_k", "top_k": 2, "activation": "gelu"}),
        dict(num_key_value_heads=None),
        dict(moe={"shared_expert_size": 48}),
        dict(moe={"shared_expert_size": 48, "use_residual": True, "routing": "top_k", "top_k": 1}),
    ],
    ids=["debug", "tied", "every-2nd", "dense", "top_k-gelu", "mha", "shared-expert", "residual"],
)
def test_parameter_summary_counts_match_the_model(overrides):
    config = debug_config(**overrides)
    model = HMoEForCausalLM(config)
    summary = parameter_summary(model)
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())
    expert_by_name = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert summary["expert_params"] == expert_by_name
    assert summary["non_expert_params"] == summary["total_params"] - summary["expert_params"]
    assert parameter_summary(config) == summary  # the analytic count agrees with the real model
    if config.moe_layer_frequency == 0:
        assert summary["expert_params"] == 0 and summary["activated_params_per_token"] == summary["total_params"]


def test_parameter_summary_activated_estimate():
    d, sizes = 64, [32, 64, 96, 128]
    experts_per_layer = sum(3 * d * h for h in sizes)
    # Top-K, k=2 of 4: half of every expert's parameters per token on average.
    top_k = parameter_summary(debug_config(moe={"routing": "top_k", "top_k": 2}))
    assert top_k["expert_params"] == 2 * experts_per_layer
    assert top_k["activated_params_per_token"] == pytest.approx(top_k["non_expert_params"] + 2 * experts_per_layer / 2)
    # Top-P, p=0.6 with a uniform router over 4 experts keeps ceil(2.4) = 3 experts.
    top_p = parameter_summary(debug_config())
    expected = top_p["non_expert_params"] + 2 * experts_per_layer * 3 / 4
    assert top_p["activated_params_per_token"] == pytest.approx(expected)


def test_expert_init_is_seeded_per_layer_and_expert_not_by_global_rng():
    """Runs that differ only in parallelism (EP size, ZeRO front-end) must start from the same experts."""
    torch.manual_seed(1)
    a = HMoEForCausalLM(debug_config())
    torch.manual_seed(2)
    b = HMoEForCausalLM(debug_config())
    sa, sb = a.state_dict(), b.state_dict()
    expert_keys = [k for k in sa if ".deepspeed_experts." in k]
    assert expert_keys and all(torch.equal(sa[k], sb[k]) for k in expert_keys)
    assert not torch.equal(sa["model.embed_tokens.weight"], sb["model.embed_tokens.weight"])
    layer0, layer1 = (a.model.layers[i].mlp.moe_core.local_expert_weights()[0]["w1"] for i in (0, 1))
    assert not torch.equal(layer0, layer1)


def test_shared_expert_model_trains_and_counts_it_as_always_active():
    model = make_model(moe={"shared_expert_size": 48})
    ids = random_ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    shared = model.model.layers[0].mlp.mlp
    assert shared.w1.weight.grad is not None and shared.w1.weight.grad.abs().sum() > 0
    assert all(s.always_active_params == 3 * 64 * 48 for s in out.routing_stats)
