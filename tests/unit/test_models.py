"""VQ-BeT and BeT policy models: tokenizers, GPT, losses, heads, decoding, persistence, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vqbet_core.config import DEFAULTS, deep_merge
from vqbet_core.errors import VqbetError
from vqbet_core.models import Policy, build_policy
from vqbet_core.models.gpt import GPT
from vqbet_core.models.losses import focal_loss
from vqbet_core.models.rvq import ResidualVQTokenizer
from vqbet_core.models.sampling import decode_codes



@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and the CI machine's two cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OBS, ACT, GOAL, WINDOW, CHUNK = 5, 2, 3, 4, 3
MODES = torch.tensor([[1.5, 0.0], [-1.5, 0.0], [0.0, 1.5], [0.0, -1.5]])


def tiny_cfg(**over) -> dict:
    base = {"gpt": {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}, "heads": {"hidden": 64},
            "vq": {"code_dim": 32, "hidden": 64, "n_codes": 8}, "bet": {"n_bins": 8},
            "obs_window": WINDOW, "action_chunk": CHUNK}
    return deep_merge(deep_merge(DEFAULTS, base), over)


def multimodal_batch(n: int, gen: torch.Generator, noise: float = 0.03):
    """obs carries the mode index (one-hot in the first 4 dims); each chunk is a constant move in that mode."""
    mode = torch.randint(0, 4, (n,), generator=gen)
    obs = torch.zeros(n, WINDOW, OBS)
    obs[torch.arange(n), :, mode] = 1.0
    obs[..., 4] = torch.randn(n, WINDOW, generator=gen)
    chunk = MODES[mode][:, None, None, :].expand(n, WINDOW, CHUNK, ACT)
    actions = chunk + noise * torch.randn(n, WINDOW, CHUNK, ACT, generator=gen)
    return obs, actions


def buffers_of(module: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- focal loss
def test_focal_loss_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # p(class 1) = 3/4, then 1/2
    target = torch.tensor([1, 0])
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    assert focal_loss(logits, target, 0.0).item() == pytest.approx(ce, rel=1e-6)
    focal2 = (0.25 ** 2 * -math.log(0.75) + 0.5 ** 2 * -math.log(0.5)) / 2
    assert focal_loss(logits, target, 2.0).item() == pytest.approx(focal2, rel=1e-6)


def test_focal_loss_gamma0_is_cross_entropy_and_gamma_downweights_easy():
    gen = torch.Generator().manual_seed(1)
    logits, target = torch.randn(64, 7, generator=gen) * 3, torch.randint(0, 7, (64,), generator=gen)
    assert torch.allclose(focal_loss(logits, target, 0.0), F.cross_entropy(logits, target), atol=1e-6)
    assert focal_loss(logits, target, 2.0) < focal_loss(logits, target, 0.0)
    assert focal_loss(torch.tensor([[50.0, 0.0]]), torch.tensor([0]), 2.0).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- residual VQ
def test_rvq_reconstruction_drops_and_usage_is_sane():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tok = ResidualVQTokenizer(CHUNK * ACT, hidden=64, code_dim=32, n_codes=8, n_layers=2)
    _, val = multimodal_batch(256, gen)
    val = val[:, 0]
    before = tok.stats(val)
    opt = torch.optim.Adam(tok.parameters(), 1e-3)
    for _ in range(150):
        loss, metrics = tok.loss(multimodal_batch(128, gen)[1][:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = tok.stats(val)
    assert after["recon_l1"] < 0.25 * before["recon_l1"] and after["recon_l1"] < 0.15
    for layer in (0, 1):
        assert 1 <= after[f"codes_used_l{layer}"] <= 8
        assert 1.0 <= after[f"perplexity_l{layer}"] <= after[f"codes_used_l{layer}"] + 1e-6
    assert after["codes_used_l0"] >= 4  # four modes need four primary codes (dead codes get restarted)
    assert max(after["codes_used_l0"], after["codes_used_l1"]) <= after["code_pairs_used"] <= 64
    codes = tok.encode(val)
    assert codes.shape == (256, 2) and codes.dtype == torch.long
    assert torch.allclose(tok.reconstruct(val), tok.decode(codes))


def test_rvq_encode_and_stats_never_touch_codebooks():
    tok = ResidualVQTokenizer(4, hidden=16, code_dim=8, n_codes=4).train()
    x = torch.randn(64, 4)
    snapshot = buffers_of(tok)
    tok.encode(x)
    tok.stats(x)
    assert all(torch.equal(snapshot[k], v) for k, v in tok.state_dict().items())
    tok.loss(x)  # a phase-1 step in train mode does update the EMA codebooks
    assert not torch.equal(snapshot["rvq.layers.0._codebook.embed"], tok.state_dict()["rvq.layers.0._codebook.embed"])


# ---------------------------------------------------------------- GPT
def test_gpt_goal_token_changes_output_and_attention_is_causal():
    torch.manual_seed(0)
    gpt = GPT(OBS, WINDOW, n_layer=2, n_head=2, n_embd=32, dropout=0.0, goal_dim=GOAL).eval()
    obs, goal = torch.randn(2, WINDOW, OBS), torch.randn(2, GOAL)
    out = gpt(obs, goal)
    assert out.shape == (2, WINDOW, 32)
    assert not torch.allclose(out, gpt(obs, goal + 1.0), atol=1e-4)
    later = obs.clone()
    later[:, -1] += 1.0
    changed = gpt(later, goal)
    assert torch.allclose(out[:, :-1], changed[:, :-1], atol=1e-6)
    assert not torch.allclose(out[:, -1], changed[:, -1], atol=1e-4)
    with pytest.raises(VqbetError, match="goal"):
        gpt(obs, None)
    with pytest.raises(VqbetError, match="obs"):
        gpt(torch.randn(2, WINDOW + 1, OBS), goal)
    with pytest.raises(VqbetError, match="goal"):
        GPT(OBS, WINDOW, 1, 2, 32, 0.0)(obs, goal)


# ---------------------------------------------------------------- heads and decoding
@pytest.mark.parametrize("kind,sequential", [("vqbet", True), ("vqbet", False), ("bet", False)])
def test_heads_shapes(kind, sequential):
    policy = build_policy(tiny_cfg(policy=kind, sampling={"sequential": sequential}), OBS, ACT, goal_dim=GOAL).eval()
    obs, actions = multimodal_batch(40, torch.Generator().manual_seed(0))
    policy.fit_tokenizer_init(actions.reshape(-1, ACT).numpy(), actions.reshape(-1, CHUNK, ACT).numpy())
    h = policy.heads(obs[:3], torch.randn(3, GOAL))
    if kind == "vqbet":
        assert h.logits.shape == (3, 2, 8) and h.offsets.shape == (3, 2, 8, CHUNK * ACT)
        assert policy.decode_table().shape == (8, 8, CHUNK * ACT)
        if sequential:
            assert h.secondary_given_primary.shape == (3, 8, 8)
            # logits[:, 1] is the marginal over primaries: a proper log distribution
            assert torch.allclose(h.logits[:, 1].exp().sum(-1), torch.ones(3), atol=1e-5)
        else:
            assert h.secondary_given_primary is None
    else:
        assert h.logits.shape == (3, 1, 8) and h.secondary_given_primary is None
        assert h.offsets.shape == (3, 1, 8, CHUNK * ACT) and policy.decode_table().shape == (8, CHUNK * ACT)
    assert policy.predict(obs[:3], torch.randn(3, GOAL)).shape == (3, CHUNK, ACT)


@pytest.mark.parametrize("kind,sequential", [("vqbet", True), ("vqbet", False), ("bet", False)])
def test_predict_at_temperature_zero_is_manual_decode(kind, sequential):
    torch.manual_seed(3)
    policy = build_policy(tiny_cfg(policy=kind, sampling={"sequential": sequential}), OBS, ACT).eval()
    obs, actions = multimodal_batch(40, torch.Generator().manual_seed(0))
    policy.fit_tokenizer_init(actions.reshape(-1, ACT).numpy(), actions.reshape(-1, CHUNK, ACT).numpy())
    h, table = policy.heads(obs[:5], None), policy.decode_table()
    expected = []
    for b in range(5):
        first = int(h.logits[b, 0].argmax())
        if kind == "bet":
            chunk = table[first] + h.offsets[b, 0, first]
        else:
            rows = h.secondary_given_primary[b, first] if sequential else h.logits[b, 1]
            second = int(rows.argmax())
            chunk = table[first, second] + h.offsets[b, 0, first] + h.offsets[b, 1, second]
        expected.append(chunk.reshape(CHUNK, ACT))
    got = policy.predict(obs[:5], None, temperature=0.0)
    assert torch.allclose(got, torch.stack(expected), atol=1e-6)
    if kind == "vqbet":  # the table really is decoder(sum of code vectors)
        books = policy.tokenizer.code_vectors()
        assert torch.allclose(table[2, 5], policy.tokenizer.decoder(books[0, 2] + books[1, 5]), atol=1e-5)


def test_sampling_with_generator_is_reproducible():
    policy = build_policy(tiny_cfg(policy="vqbet"), OBS, ACT).eval()
    obs = torch.randn(16, WINDOW, OBS)
    a = policy.predict(obs, None, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = policy.predict(obs, None, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- BeT k-means
def test_bet_kmeans_round_trip():
    policy = build_policy(tiny_cfg(policy="bet", bet={"n_bins": 4}), OBS, ACT)
    _, actions = multimodal_batch(200, torch.Generator().manual_seed(0))
    chunks = actions[:, 0]
    policy.fit_tokenizer_init(chunks.reshape(-1, ACT).numpy(), chunks.numpy())
    centers = policy.decode_table()
    again = build_policy(tiny_cfg(policy="bet", bet={"n_bins": 4}), OBS, ACT)
    again.fit_tokenizer_init(chunks.reshape(-1, ACT).numpy(), chunks.numpy())
    assert torch.equal(centers, again.decode_table())  # fixed random_state
    # each behaviour mode has its own centre, close to the mode's chunk
    found = sorted(int(torch.cdist(MODES[m].repeat(CHUNK)[None], centers).argmin()) for m in range(4))
    assert found == [0, 1, 2, 3]
    assert torch.cdist(MODES.repeat(1, CHUNK), centers).min(1).values.max() < 0.05
    bins = policy.nearest_bin(chunks)
    residual = chunks.reshape(len(chunks), -1) - centers[bins]
    offsets = residual[:, None, None, :].expand(-1, 1, 4, -1).contiguous()  # (B, 1, K, W*A)
    heads = type(policy.heads(torch.zeros(1, WINDOW, OBS), None))(torch.zeros(len(chunks), 1, 4), None, offsets)
    assert torch.allclose(decode_codes(heads, centers, bins[:, None], CHUNK, ACT), chunks, atol=1e-6)
    assert policy.tokenizer_loss(chunks) is None
    stats = policy.tokenizer_stats(chunks)
    assert stats["codes_used_l0"] == 4 and stats["recon_l1"] < 0.05


def test_bet_errors_before_fit_and_with_too_few_chunks():
    policy = build_policy(tiny_cfg(policy="bet"), OBS, ACT)
    with pytest.raises(VqbetError, match="not fitted"):
        policy.decode_table()
    with pytest.raises(VqbetError, match="n_bins"):
        policy.fit_tokenizer_init(np.zeros((3, ACT)), np.zeros((3, CHUNK, ACT)))
    with pytest.raises(VqbetError, match="action chunks"):
        policy.fit_tokenizer_init(np.zeros((30, ACT)), np.zeros((30, CHUNK + 1, ACT)))


@pytest.mark.parametrize("n_bins", [1, 4])
def test_bet_single_bin_regresses_to_the_mean_and_bins_keep_the_modes(n_bins):
    """Modes hidden from the obs: 1 bin (plain MSE regression) predicts the average, 4 bins keep the modes."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    policy = build_policy(tiny_cfg(policy="bet", bet={"n_bins": n_bins}), OBS, ACT)
    _, actions = multimodal_batch(128, gen)
    obs = torch.zeros(128, WINDOW, OBS)  # one and the same observation for all four modes
    policy.fit_tokenizer_init(actions.reshape(-1, ACT).numpy(), actions.reshape(-1, CHUNK, ACT).numpy())
    policy.freeze_tokenizer()
    policy.train()
    opt = torch.optim.Adam(policy.policy_parameters(), 3e-3)
    for _ in range(30):
        loss, metrics = policy.policy_loss(obs, None, actions)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    h = policy.heads(obs[:2], None)
    assert h.logits.shape == (2, 1, n_bins) and h.offsets.shape == (2, 1, n_bins, CHUNK * ACT)
    chunks = policy.predict(obs, None, temperature=1.0, generator=torch.Generator().manual_seed(0))
    to_modes = torch.cdist(chunks.reshape(-1, ACT), MODES)  # every action of every predicted chunk
    if n_bins == 1:
        assert float(metrics["bin_loss"]) == 0.0 and float(metrics["bin_acc"]) == 1.0
        assert chunks.abs().max() < 0.4 and to_modes.min() > 1.0  # the mean of the modes: none of them
    else:
        assert to_modes.min(1).values.max() < 0.4  # every prediction is one of the modes
        assert len(torch.unique(to_modes.argmin(1))) >= 3  # and several modes are taken


# ---------------------------------------------------------------- freezing and persistence
def test_frozen_tokenizer_stays_frozen_through_train_and_loss():
    policy = build_policy(tiny_cfg(policy="vqbet"), OBS, ACT)
    obs, actions = multimodal_batch(32, torch.Generator().manual_seed(0))
    policy.freeze_tokenizer()
    policy.train()
    assert policy.gpt.training and not policy.tokenizer.training
    assert all(not p.requires_grad for p in policy.tokenizer.parameters())
    assert not ({id(p) for p in policy.policy_parameters()} & {id(p) for p in policy.tokenizer_parameters()})
    snapshot = buffers_of(policy.tokenizer)
    loss, _ = policy.policy_loss(obs, None, actions)
    loss.backward()
    assert all(torch.equal(snapshot[k], v) for k, v in policy.tokenizer.state_dict().items())
    assert all(p.grad is None for p in policy.tokenizer.parameters())
    with pytest.raises(VqbetError, match="frozen"):
        policy.tokenizer_loss(actions[:, 0])


@pytest.mark.parametrize("kind", ["vqbet", "bet"])
def test_safetensors_round_trip_gives_identical_heads(kind, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(policy=kind)
    policy = build_policy(cfg, OBS, ACT, goal_dim=GOAL)
    obs, actions = multimodal_batch(64, torch.Generator().manual_seed(0))
    policy.fit_tokenizer_init(actions.reshape(-1, ACT).numpy(), actions.reshape(-1, CHUNK, ACT).numpy())
    policy.train()
    if kind == "vqbet":  # move the EMA codebooks and cluster sizes away from their initial values
        for _ in range(3):
            policy.tokenizer_loss(actions[:, 0])[0].backward()
    policy.freeze_tokenizer()
    path = tmp_path / "policy.safetensors"
    save_file(policy.state_dict(), str(path))
    torch.manual_seed(123)  # a differently initialised fresh policy
    fresh = build_policy(cfg, OBS, ACT, goal_dim=GOAL)
    fresh.load_state_dict(load_file(str(path)))
    goal = torch.randn(64, GOAL)
    h1, h2 = policy.eval().heads(obs, goal), fresh.eval().heads(obs, goal)
    assert torch.equal(h1.logits, h2.logits) and torch.equal(h1.offsets, h2.offsets)
    if kind == "vqbet":
        assert torch.equal(h1.secondary_given_primary, h2.secondary_given_primary)
        assert torch.equal(policy.tokenizer.encode(actions[:, 0]), fresh.tokenizer.encode(actions[:, 0]))
    assert torch.equal(policy.decode_table(), fresh.decode_table())
    assert bool(fresh.tokenizer_frozen)
    fresh.train()
    assert all(not m.training for m in fresh.tokenizer_modules())


# ---------------------------------------------------------------- phase-2 loss
def test_vqbet_policy_loss_matches_hand_computation_from_heads():
    """With T = 1 the loss over all history steps is the loss of the exported heads: check it by hand."""
    torch.manual_seed(0)
    cfg = tiny_cfg(policy="vqbet", obs_window=1, loss={"offset_codes": "true"})
    policy = build_policy(cfg, OBS, ACT).eval()
    obs, actions = torch.randn(16, 1, OBS), torch.randn(16, 1, CHUNK, ACT)
    loss, metrics = policy.policy_loss(obs, None, actions)
    with torch.no_grad():
        h, table = policy.heads(obs, None), policy.decode_table()
    chunks = actions.reshape(16, -1)
    codes = policy.tokenizer.encode(chunks)
    p, s, rows = codes[:, 0], codes[:, 1], torch.arange(16)
    primary = focal_loss(h.logits[:, 0], p, 2.0)
    secondary = focal_loss(h.secondary_given_primary[rows, p], s, 2.0)
    offset = (table[p, s] + h.offsets[rows, 0, p] + h.offsets[rows, 1, s] - chunks).abs().mean()
    assert float(metrics["primary_loss"]) == pytest.approx(float(primary), rel=1e-5)
    assert float(metrics["secondary_loss"]) == pytest.approx(float(secondary), rel=1e-5)
    assert float(metrics["offset_loss"]) == pytest.approx(float(offset), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(5.0 * primary + 0.5 * secondary + 100.0 * offset), rel=1e-5)


@pytest.mark.parametrize("offset_codes", ["sampled", "true", "true_primary", "both"])
def test_vqbet_phase2_overfits_small_multimodal_set(offset_codes):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    policy = build_policy(tiny_cfg(policy="vqbet", loss={"offset_codes": offset_codes}), OBS, ACT)
    obs, actions = multimodal_batch(64, gen)
    policy.fit_tokenizer_init(actions.reshape(-1, ACT).numpy(), actions.reshape(-1, CHUNK, ACT).numpy())
    policy.train()
    opt = torch.optim.Adam(policy.tokenizer_parameters(), 1e-3)
    for _ in range(100):
        loss, _ = policy.tokenizer_loss(multimodal_batch(128, gen)[1][:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.freeze_tokenizer()
    opt = torch.optim.AdamW(policy.policy_parameters(), 1e-3)
    history = []
    for _ in range(60):
        loss, metrics = policy.policy_loss(obs, None, actions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}})
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]
    # the obs tells the mode, not the noise, so the best possible primary accuracy is the share of each
    # mode's most frequent primary code (a mode's chunks may be split over several codes)
    primary = policy.tokenizer.encode(actions.reshape(-1, CHUNK, ACT))[:, 0].reshape(64, WINDOW)
    mode = obs[:, 0, :4].argmax(-1)
    best = sum(int(torch.bincount(primary[mode == m].reshape(-1)).max()) for m in range(4) if (mode == m).any())
    assert history[-1]["primary_acc"] > best / primary.numel() - 0.05
    assert history[-1]["action_l1_argmax"] < 0.1
    chunk = policy.eval().predict(obs, None, temperature=0.0)
    assert (chunk - actions[:, -1]).abs().mean() < 0.2


def test_offsets_on_sampled_codes_average_ambiguous_modes_true_codes_keep_them():
    """One observation, four modes: the offset head trained on *sampled* codes (the official loss) learns
    to pull every code towards the middle of the modes; trained on the *true* codes (or the true primary
    with a sampled secondary, or on true and sampled codes together) it keeps them."""
    spread = {}
    for offset_codes in ("sampled", "true", "true_primary", "both"):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        policy = build_policy(tiny_cfg(policy="vqbet", vq={"n_codes": 4}, loss={"offset_codes": offset_codes}), OBS, ACT)
        _, actions = multimodal_batch(128, gen)
        obs = torch.zeros(128, WINDOW, OBS)
        policy.train()
        opt = torch.optim.Adam(policy.tokenizer_parameters(), 1e-3)
        for _ in range(80):
            loss, _ = policy.tokenizer_loss(multimodal_batch(128, gen)[1][:, 0])
            opt.zero_grad()
            loss.backward()
            opt.step()
        policy.freeze_tokenizer()
        opt = torch.optim.AdamW(policy.policy_parameters(), 1e-3)
        for _ in range(60):
            loss, _ = policy.policy_loss(obs, None, actions)
            opt.zero_grad()
            loss.backward()
            opt.step()
        chunks = policy.eval().predict(obs, None, temperature=1.0, generator=torch.Generator().manual_seed(0))
        to_modes = torch.cdist(chunks.reshape(-1, ACT), MODES)
        spread[offset_codes] = (float(to_modes.min(1).values.mean()), len(torch.unique(to_modes.argmin(1))))
    assert spread["true"][0] < 0.1 and spread["true"][1] == 4
    assert spread["true_primary"][0] < 0.1 and spread["true_primary"][1] == 4
    assert spread["sampled"][0] > 0.5
    # the mean of both losses keeps the modes: per dimension the L1 optimum is the median of the targets, and the
    # true code's own action carries more than half of their weight
    assert spread["both"][0] < 0.15 and spread["both"][1] == 4


# ---------------------------------------------------------------- bad input
def test_bad_config_and_inputs_raise_one_line_errors():
    with pytest.raises(VqbetError, match="policy"):
        build_policy(tiny_cfg(policy="diffusion"), OBS, ACT)
    with pytest.raises(VqbetError, match="obs_dim"):
        build_policy(tiny_cfg(), 0, ACT)
    with pytest.raises(VqbetError, match="offset_codes"):
        build_policy(tiny_cfg(loss={"offset_codes": "best"}), OBS, ACT)
    with pytest.raises(VqbetError, match="n_bins"):
        build_policy(tiny_cfg(policy="bet", bet={"n_bins": 0}), OBS, ACT)
    policy = build_policy(tiny_cfg(), OBS, ACT)
    assert isinstance(policy, Policy) and policy.kind == "vqbet"
    obs, actions = multimodal_batch(4, torch.Generator().manual_seed(0))
    with pytest.raises(VqbetError, match="actions"):
        policy.policy_loss(obs, None, actions[:, :, :1])
    with pytest.raises(VqbetError, match="obs"):
        policy.heads(obs[..., :3], None)
    with pytest.raises(VqbetError, match="action chunks"):
        policy.fit_tokenizer_init(np.zeros((4, ACT)), np.zeros((4, CHUNK, ACT + 1)))
    with pytest.raises(VqbetError, match="action chunks"):
        policy.tokenizer_stats(torch.zeros(4, CHUNK + 1, ACT))
