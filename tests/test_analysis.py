"""Noise-propagation profile (paper Fig. 1) and noise spectrum (paper Fig. 6): what they measure, and the
figures and tables they write."""
import csv

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, RobertaConfig, RobertaModel

from lnsr_fast import GaussianNoise, InManifoldNoise
from lnsr_fast.analysis import (average_profiles, injection_profiles, noise_propagation, noise_spectrum,
                                plot_noise_propagation, plot_spectrum, profile_range, write_noise_propagation_csv,
                                write_spectrum_csv)

VOCAB, LAYERS = 64, 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_bert(seed: int = 0, zero_positions: bool = False) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    model = BertModel(config)
    if zero_positions:
        with torch.no_grad():
            model.embeddings.position_embeddings.weight.zero_()
            model.embeddings.token_type_embeddings.weight.zero_()
    return model.train()   # noise_propagation must switch to eval mode itself


def batches(n: int = 3, b: int = 4, t: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, VOCAB, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        mask[torch.arange(t)[None, :] >= lengths[:, None]] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.zeros(b, dtype=torch.long)})
    return out


def zero_noise(input_ids, inputs_embeds, attention_mask=None):
    return torch.zeros_like(inputs_embeds)


def token_noise(ratio):
    """A deterministic ε that depends on each token's own x only (so batching cannot change it)."""
    def noise(input_ids, inputs_embeds, attention_mask=None):
        eps = inputs_embeds.flip(-1) * ratio
        return eps if attention_mask is None else eps * attention_mask[..., None]
    return noise


def test_zero_noise_gives_zero_deviation_at_every_layer():
    profile = noise_propagation(tiny_bert(), zero_noise, batches())
    assert list(profile) == list(range(LAYERS + 1))   # hidden_states[0..L]
    assert all(v == 0.0 for v in profile.values()), profile


def test_restores_training_mode_and_needs_no_grad():
    model = tiny_bert()
    noise_propagation(model, GaussianNoise(0.05, seed=0), batches(n=1))
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_makes_it_deterministic():
    # dropout would make two calls differ; eval mode and a fresh sampler with the same seed make them equal
    model = tiny_bert()
    a = noise_propagation(model, GaussianNoise(0.05, seed=3), batches())
    b = noise_propagation(model, GaussianNoise(0.05, seed=3), batches())
    assert a == b


def test_deviation_grows_with_the_ratio_at_every_layer():
    model = tiny_bert()
    profiles = [noise_propagation(model, GaussianNoise(r, seed=0), batches()) for r in (0.01, 0.05, 0.2)]
    for layer in profiles[0]:
        values = [p[layer] for p in profiles]
        assert 0 < values[0] < values[1] < values[2], (layer, values)


def test_layer0_deviation_equals_the_ratio_when_only_word_embeddings_feed_the_layer_norm():
    # hidden_states[0] = LayerNorm(word + position + type embeddings). With the position and type
    # embeddings zeroed, LayerNorm (scale invariant) sees x + ε only, so ‖Δh_0‖/‖h_0‖ ≈ ‖ε‖/‖x‖ = ratio.
    for ratio in (0.02, 0.1):
        profile = noise_propagation(tiny_bert(zero_positions=True), GaussianNoise(ratio, seed=0), batches())
        assert profile[0] == pytest.approx(ratio, rel=0.15), (ratio, profile[0])


def test_layer0_deviation_is_below_the_ratio_with_position_embeddings():
    # The position/type embeddings add to ‖x‖ but not to ‖ε‖, so the relative deviation shrinks.
    profile = noise_propagation(tiny_bert(), GaussianNoise(0.1, seed=0), batches())
    assert 0 < profile[0] < 0.1


def test_padding_is_excluded_and_tokens_are_averaged_over_the_whole_set():
    # Per-token deviations averaged over every real token: one padded batch gives what the same
    # sentences give unpadded one at a time (weighted by their lengths).
    model = tiny_bert()
    ids = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 20, 21, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    padded = noise_propagation(model, token_noise(0.05), [{"input_ids": ids, "attention_mask": mask}])
    singles = [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]} for i, n in ((0, 6), (1, 4))]
    unpadded = noise_propagation(model, token_noise(0.05), singles)
    for layer in padded:
        assert padded[layer] == pytest.approx(unpadded[layer], rel=1e-4, abs=1e-7)
    # and the pad positions do not count: changing what sits there changes nothing
    ids2 = ids.clone()
    ids2[1, 4:] = 7
    again = noise_propagation(model, token_noise(0.05), [{"input_ids": ids2, "attention_mask": mask}])
    for layer in padded:
        assert again[layer] == pytest.approx(padded[layer], rel=1e-5, abs=1e-8)


def test_roberta_positions_are_the_ones_it_uses_for_input_ids():
    # RoBERTa numbers positions from input_ids (padding aware) but not from inputs_embeds: the profile
    # must use the former, or left padding would shift every position of the padded row.
    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=40, pad_token_id=1))
    ids = torch.tensor([[1, 1, 0, 10, 11, 2], [0, 20, 21, 22, 23, 2]])
    mask = (ids != 1).long()
    padded = noise_propagation(model, token_noise(0.05), [{"input_ids": ids, "attention_mask": mask}])
    singles = [{"input_ids": ids[:1, 2:], "attention_mask": mask[:1, 2:]}, {"input_ids": ids[1:], "attention_mask": mask[1:]}]
    unpadded = noise_propagation(model, token_noise(0.05), singles)
    for layer in padded:
        assert padded[layer] == pytest.approx(unpadded[layer], rel=1e-4, abs=1e-7)


def test_layers_subset_and_in_manifold_noise():
    model = tiny_bert()
    noise = InManifoldNoise(model.get_input_embeddings(), k=4, ratio=0.05, seed=0)
    profile = noise_propagation(model, noise, batches(n=1), layers=[0, LAYERS])
    assert list(profile) == [0, LAYERS] and all(v > 0 for v in profile.values())


def test_bad_arguments_are_named():
    model = tiny_bert()
    with pytest.raises(ValueError, match="out of range"):
        noise_propagation(model, zero_noise, batches(n=1), layers=[LAYERS + 1])
    with pytest.raises(ValueError, match="input_ids"):
        noise_propagation(model, zero_noise, [{"attention_mask": torch.ones(1, 3)}])
    with pytest.raises(ValueError, match="no real token"):
        noise_propagation(model, zero_noise, [])
    with pytest.raises(ValueError, match="shape"):
        noise_propagation(model, lambda i, x, m: x[:, :1], batches(n=1))
    with pytest.raises(TypeError, match="noise"):
        noise_propagation(model, None, batches(n=1))


def test_average_profiles_and_range():
    mean, std = average_profiles([{0: 1.0, 1: 2.0}, {0: 3.0, 1: 2.0}])
    assert mean == {0: 2.0, 1: 2.0} and std == {0: 1.0, 1: 0.0}
    assert profile_range([{0: 1.0, 1: 2.0}, {0: 3.0, 1: 2.0}]) == {0: (1.0, 3.0), 1: (2.0, 2.0)}
    with pytest.raises(ValueError, match="same layers"):
        average_profiles([{0: 1.0}, {1: 1.0}])


def test_plot_and_csv_one_panel_and_several(tmp_path):
    flat = {"FT": {0: 0.05, 1: 0.03, 2: 0.04}, "LNSR": {0: 0.05, 1: 0.02, 2: 0.02}}
    plot_noise_propagation(flat, tmp_path / "one.png", title="t")
    nested = {"Gaussian": flat, "in-manifold": {"FT": {0: 0.0, 1: 0.1, 2: 0.2}, "LNSR": {0: 0.0, 1: 0.1, 2: 0.1}}}
    spread = {"Gaussian": {"FT": {0: 0.0, 1: 0.01, 2: 0.01}, "LNSR": {0: 0, 1: 0, 2: 0}},
              "in-manifold": {"FT": {0: 0, 1: 0, 2: 0}, "LNSR": {0: 0, 1: 0, 2: 0}}}
    band = {"Gaussian": {"FT": profile_range([flat["FT"], flat["LNSR"]])}}
    plot_noise_propagation(nested, tmp_path / "two.png", band=band, note="a note")   # zeros: linear axis
    plot_noise_propagation({"a": {0: 1e-4, 1: 0.1}}, tmp_path / "log.png", band={"a": {0: (1e-5, 1e-3), 1: (0.1, 0.1)}})
    for name in ("one.png", "two.png", "log.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    write_noise_propagation_csv(nested, tmp_path / "p.csv", spread=spread)
    rows = list(csv.reader(open(tmp_path / "p.csv")))
    assert rows[0] == ["layer", "Gaussian/FT", "Gaussian/FT std", "Gaussian/LNSR", "Gaussian/LNSR std",
                       "in-manifold/FT", "in-manifold/FT std", "in-manifold/LNSR", "in-manifold/LNSR std"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]   # one row per layer
    assert float(rows[2][1]) == 0.03 and float(rows[2][2]) == 0.01
    write_noise_propagation_csv(flat, tmp_path / "flat.csv")
    assert list(csv.reader(open(tmp_path / "flat.csv")))[0] == ["layer", "FT", "LNSR"]



# --- injection at a hidden state (inject_at) ---------------------------------------------------------------

def layer_hooks(model):
    return [len(layer._forward_hooks) for layer in model.encoder.layer]


def test_zero_noise_gives_zero_deviation_at_every_injection_position():
    model = tiny_bert()
    for b in range(LAYERS + 1):
        profile = noise_propagation(model, zero_noise, batches(n=1), inject_at=b)
        assert list(profile) == list(range(b, LAYERS + 1))   # the default covers b..L
        assert all(v == 0.0 for v in profile.values()), (b, profile)


def test_deviation_grows_with_the_ratio_when_injected_in_a_hidden_state():
    model = tiny_bert()
    profiles = [noise_propagation(model, GaussianNoise(r, seed=0), batches(n=1), inject_at=1) for r in (0.01, 0.05, 0.2)]
    for layer in profiles[0]:
        values = [p[layer] for p in profiles]
        assert 0 < values[0] < values[1] < values[2], (layer, values)


@pytest.mark.parametrize("warm", [False, True])
def test_injection_leaves_lower_layers_untouched_and_layer_b_moves_by_the_ratio(warm):
    # Transformers 5.x records hidden_states with its own forward hooks on the layers, installed at the first
    # call that asks for them: a warm model has them before ours, a fresh one after. Both must give
    # hidden_states[b] = the noisy state.
    model = tiny_bert()
    if warm:
        with torch.no_grad():
            model(**{k: v for k, v in batches(n=1)[0].items() if k != "labels"}, output_hidden_states=True)
    for b in (1, 2, LAYERS):
        profile = noise_propagation(model, GaussianNoise(0.05, seed=0), batches(n=1), layers=range(LAYERS + 1), inject_at=b)
        assert all(profile[r] == 0.0 for r in range(b)), (b, profile)
        assert profile[b] == pytest.approx(0.05, abs=1e-6), (b, profile)
        assert all(profile[r] > 0 for r in range(b + 1, LAYERS + 1)), (b, profile)


def test_injection_in_a_classifier_and_injection_profiles():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=2))
    profiles = injection_profiles(model, lambda: GaussianNoise(0.1, seed=1), batches(n=1), [0, 2])
    assert list(profiles) == [0, 2] and list(profiles[2]) == [2, 3]
    assert profiles[2][2] == pytest.approx(0.1, abs=1e-6)
    assert profiles[0] == noise_propagation(model, GaussianNoise(0.1, seed=1), batches(n=1))   # same draws
    assert profiles[0][2] != profiles[2][2]


def test_hook_is_removed_after_the_call_and_after_an_error():
    model = tiny_bert()
    noise_propagation(model, zero_noise, batches(n=1))   # Transformers installs its own capture hooks once
    before = layer_hooks(model)
    seen = []

    def spy(input_ids, h, mask):
        seen.append(layer_hooks(model))
        return zero_noise(input_ids, h, mask)
    noise_propagation(model, spy, batches(n=1), inject_at=2)
    assert seen == [[n + (i == 1) for i, n in enumerate(before)]]   # one extra hook, on layer 2, during the call
    assert layer_hooks(model) == before

    def broken(input_ids, h, mask):
        raise RuntimeError("sampler failed")
    with pytest.raises(RuntimeError, match="sampler failed"):
        noise_propagation(model, broken, batches(n=1), inject_at=2)
    assert layer_hooks(model) == before
    with pytest.raises(ValueError, match="shape"):   # a wrong ε from inside the hook is named too
        noise_propagation(model, lambda i, h, m: h[:, :1], batches(n=1), inject_at=1)
    assert layer_hooks(model) == before and model.training


def test_bad_inject_at_is_named():
    model = tiny_bert()
    for bad in (-1, LAYERS + 1, 1.0, True, "1"):
        with pytest.raises(ValueError, match="inject_at"):
            noise_propagation(model, zero_noise, batches(n=1), inject_at=bad)
    noise = InManifoldNoise(model.get_input_embeddings(), k=4, ratio=0.05, seed=0)
    with pytest.raises(ValueError, match="inject_at"):
        noise_propagation(model, noise, batches(n=1), inject_at=1)
    model.config.num_hidden_layers = LAYERS + 5   # not the layer modules it has: none is hidden state b alone
    with pytest.raises(ValueError, match="transformer layer module"):
        noise_propagation(model, zero_noise, batches(n=1), inject_at=1)


# --- noise spectrum ------------------------------------------------------------------------------------------

DIM, K = 32, 4


def spectrum_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, DIM, generator=g)
    ids = torch.randint(0, VOCAB, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return weight, ids, weight[ids], mask


def test_in_manifold_noise_lies_in_k_components_and_gaussian_noise_does_not():
    weight, ids, x, mask = spectrum_inputs()
    manifold = noise_spectrum(InManifoldNoise(weight, k=K, ratio=0.1, seed=0), ids, x, mask, draws=200)
    gaussian = noise_spectrum(GaussianNoise(0.1, seed=0), ids, x, mask, draws=200)
    for s in (manifold, gaussian):
        assert s.dtype == torch.float64 and s.shape == (DIM,)
        assert float(s.sum()) == pytest.approx(1.0, abs=1e-9)
        assert bool((s[:-1] >= s[1:] - 1e-12).all())   # sorted descending
    assert float(manifold[:K].sum()) >= 0.999
    # isotropic: the first k of d components hold about k/d (sampling spreads the eigenvalues a little)
    assert K / DIM * 0.8 < float(gaussian[:K].sum()) < 2 * K / DIM
    assert float(gaussian[-1]) > 0.2 / DIM


def test_spectrum_is_centred():
    # A constant offset is no variance: centred, offset + isotropic noise spreads like isotropic noise
    # (uncentred, the offset alone would take almost all of it in the first component).
    weight, ids, x, mask = spectrum_inputs()
    torch.manual_seed(0)
    def offset_noise(input_ids, embeds, attention_mask):
        return (torch.ones_like(embeds) + 0.01 * torch.randn_like(embeds)) * attention_mask[..., None]
    s = noise_spectrum(offset_noise, ids, x, mask, draws=200)
    assert float(s[0]) < 2 / DIM and float(s.sum()) == pytest.approx(1.0)


def test_spectrum_ignores_padding_and_checks_its_arguments():
    weight, ids, x, mask = spectrum_inputs()
    def pad_only_noise(input_ids, embeds, attention_mask):   # varies only at padding: nothing to measure
        return torch.randn_like(embeds) * (attention_mask == 0)[..., None]
    with pytest.raises(ValueError, match="did not vary"):
        noise_spectrum(pad_only_noise, ids, x, mask, draws=8)
    with pytest.raises(ValueError, match="draws"):
        noise_spectrum(GaussianNoise(0.1), ids, x, mask, draws=1)
    with pytest.raises(ValueError, match="real token"):
        noise_spectrum(GaussianNoise(0.1), ids, x, torch.zeros_like(mask), draws=8)


def test_spectrum_csv_and_png(tmp_path):
    weight, ids, x, mask = spectrum_inputs()
    spectra = {"Gaussian": noise_spectrum(GaussianNoise(0.1, seed=0), ids, x, mask, draws=64),
               "in-manifold k=4": noise_spectrum(InManifoldNoise(weight, k=K, ratio=0.1, seed=0), ids, x, mask, draws=64)}
    write_spectrum_csv(spectra, tmp_path / "s.csv")
    rows = list(csv.reader(open(tmp_path / "s.csv")))
    assert rows[0] == ["component", "Gaussian", "Gaussian cumulative", "in-manifold k=4", "in-manifold k=4 cumulative"]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(1, DIM + 1)]
    assert float(rows[1][1]) == pytest.approx(float(spectra["Gaussian"][0]), rel=1e-5)
    assert float(rows[K][4]) >= 0.999 and float(rows[-1][2]) == pytest.approx(1.0, abs=1e-5)
    plot_spectrum(spectra, tmp_path / "s.png", note="tiny vocabulary, 64 draws")
    plot_spectrum(spectra, tmp_path / "first8.png", title="first 8", components=8)
    for name in ("s.png", "first8.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
