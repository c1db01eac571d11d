import numpy as np
import pytest
from scipy.signal import welch

from voiceprint.data import augment as A
from voiceprint.core.params import Params, ParamsError, load_params
from tests.conftest import REPO

SR = 16000


def speechlike(seconds=2.0, seed=0, amplitude=0.3):
    """Harmonics of a wobbling pitch under a syllable-rate envelope: enough like speech for level checks."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 20 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    x += 0.01 * rng.standard_normal(len(t))
    return (amplitude * x / np.abs(x).max()).astype(np.float32)


def snr_db(clean, mixed):
    clean = clean.astype(np.float64)
    noise = mixed.astype(np.float64) - clean
    return 10 * np.log10(np.mean(clean ** 2) / np.mean(noise ** 2))


def rng(seed=0):
    return np.random.default_rng(seed)


def test_rng_for_is_a_stable_hash_of_seed_and_key():
    assert rng_list(A.rng_for(11, "spk1/utt1")) == [151385237, 1041159671, 844620691]
    assert rng_list(A.rng_for(11, "spk1/utt2"), 1) == [137472357]
    assert rng_list(A.rng_for(12, "spk1/utt1"), 1) == [457219297]


def rng_list(g, n=3):
    return g.integers(1 << 30, size=n).tolist()


# --- noise and babble -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
@pytest.mark.parametrize("target", [0.0, 5.0, 12.5, 20.0])
def test_noise_is_mixed_at_the_exact_snr(colour, target):
    wav = speechlike()
    out = A.add_noise(wav, rng(1), target, colour)
    assert out.dtype == np.float32 and out.shape == wav.shape
    assert abs(snr_db(wav, out) - target) < 0.01


@pytest.mark.parametrize("colour, slope", [("white", 0.0), ("pink", -10.0), ("brown", -20.0)])
def test_noise_colour_is_the_psd_slope_in_db_per_decade(colour, slope):
    noise = A.coloured_noise(1 << 18, rng(2), colour)
    assert abs(np.mean(noise ** 2) - 1.0) < 1e-9
    f, psd = welch(noise, fs=SR, nperseg=4096)
    band = (f >= 50) & (f <= 5000)
    fitted = 10 * np.polyfit(np.log10(f[band]), np.log10(psd[band]), 1)[0]
    assert abs(fitted - slope) < 1.0


def test_unknown_colour_fails():
    with pytest.raises(ValueError, match="colour 'blue'"):
        A.add_noise(speechlike(), rng(), 10.0, "blue")


def test_silence_is_left_alone_and_loud_mixes_are_scaled_not_clipped():
    silent = np.zeros(800, np.float32)
    np.testing.assert_array_equal(A.add_noise(silent, rng(), 10.0), silent)
    loud = speechlike(amplitude=1.0)
    out = A.add_noise(loud, rng(3), 0.0, "white")
    assert np.abs(out).max() <= 1.0
    assert np.abs(out).max() == pytest.approx(1.0)


@pytest.mark.parametrize("target", [0.0, 5.0, 20.0])
@pytest.mark.parametrize("talkers", [1, 3, 6])
def test_babble_is_mixed_at_the_exact_snr(target, talkers):
    wav = speechlike(2.0, seed=0)
    # shorter (looped) and longer (cropped) than wav, at very different levels
    others = [speechlike(s, seed=i + 1, amplitude=a) for i, (s, a) in enumerate([(0.7, 0.01), (3.0, 0.9),
                                                                                 (1.3, 0.2), (2.5, 0.05)])]
    out = A.add_babble(wav, others, rng(4), target, talkers)
    assert out.dtype == np.float32 and out.shape == wav.shape
    assert abs(snr_db(wav, out) - target) < 0.01


def test_babble_talkers_are_normalised_to_equal_power():
    t = np.arange(SR) / SR
    quiet = (0.001 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    loud = (0.9 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    wav = speechlike(1.0)
    babble = A.add_babble(wav, [quiet, loud], rng(5), 10.0, 2).astype(np.float64) - wav
    spectrum = np.abs(np.fft.rfft(babble)) ** 2      # 1 Hz bins
    assert spectrum[300] == pytest.approx(spectrum[1000], rel=0.01)


def test_babble_needs_other_utterances():
    with pytest.raises(ValueError, match="babble"):
        A.add_babble(speechlike(), [], rng(), 10.0, 3)
    with pytest.raises(ValueError, match="babble"):
        A.add_babble(speechlike(), [speechlike()], rng(), 10.0, 0)
    wav = speechlike()
    np.testing.assert_array_equal(A.add_babble(wav, [np.zeros(100, np.float32)], rng(), 10.0, 3), wav)


# --- reverberation ----------------------------------------------------------------------------------------------

def rt60_schroeder(rir):
    """T30: a line fitted to the Schroeder backward-integrated energy decay between -5 and -35 dB, extended to
    -60 dB (T20's -25 dB is still dominated by the direct sound at short RT60s and reads them ~10% short)."""
    energy = np.cumsum(rir[::-1].astype(np.float64) ** 2)[::-1]
    edc = 10 * np.log10(energy / energy[0])
    fit = (edc <= -5) & (edc >= -35)
    slope = np.polyfit(np.arange(len(rir))[fit] / SR, edc[fit], 1)[0]
    return -60.0 / slope


@pytest.mark.parametrize("rt60", [0.25, 0.5, 0.8])
def test_rir_decays_at_the_requested_rt60(rt60):
    for seed in range(4):
        rir = A.room_impulse_response(rng(seed), SR, (rt60, rt60))
        assert rir.dtype == np.float32
        assert np.abs(rir).max() == pytest.approx(1.0, abs=0.2)    # direct path = 1 (+ a coinciding image)
        assert rt60_schroeder(rir) == pytest.approx(rt60, rel=0.12)


def test_rir_rt60_stays_in_the_default_range():
    estimates = [rt60_schroeder(A.room_impulse_response(rng(seed))) for seed in range(10)]
    assert 0.2 * 0.85 <= min(estimates) and max(estimates) <= 0.8 * 1.1
    assert max(estimates) - min(estimates) > 0.2        # the RT60 is drawn, not fixed


def test_reverberate_keeps_length_level_and_timing():
    wav = (0.1 * rng(5).standard_normal(2 * SR)).astype(np.float32)   # aperiodic, so one correlation peak
    rir = A.room_impulse_response(rng(6), SR, (0.6, 0.6))
    assert np.argmax(np.abs(rir)) > 20                  # the direct path arrives after a delay ...
    out = A.reverberate(wav, rir)
    assert out.dtype == np.float32 and out.shape == wav.shape
    assert np.sqrt(np.mean(out.astype(np.float64) ** 2)) == pytest.approx(np.sqrt(np.mean(wav.astype(
        np.float64) ** 2)), rel=1e-5)
    lags = np.arange(-200, 201)                          # ... which reverberate removes
    xcorr = np.array([np.dot(wav[200:-200], np.roll(out, -lag)[200:-200]) for lag in lags])
    assert np.abs(xcorr[lags < 0]).max() < 0.1 * xcorr[lags == 0][0]
    assert xcorr[lags == 0][0] >= 0.5 * np.abs(xcorr).max()
    assert not np.allclose(out, wav, atol=0.01)


def test_reverberate_aligns_on_the_direct_path_not_a_louder_reflection():
    wav = np.zeros(SR, np.float32)
    wav[1000] = 0.5
    aligned = 0
    for seed in range(60):
        rir = A.room_impulse_response(rng(seed))
        out = A.reverberate(wav, rir)
        assert np.abs(out[:1000]).max() < 1e-5 * np.abs(out).max()   # nothing before the direct sound ...
        assert np.abs(out[1000]) >= 0.5 * np.abs(out).max()          # ... which is where the impulse was
        aligned += np.argmax(np.abs(rir)) == np.flatnonzero(rir)[0]
    assert aligned < 60                                   # some RIRs do have a reflection above the direct path


# --- speed perturbation -----------------------------------------------------------------------------------------

def peak_hz(x):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * SR / len(x)


@pytest.mark.parametrize("factor, samples, hz", [(0.9, 17778, 180.0), (1.1, 14545, 220.0)])
def test_speed_perturb_changes_length_and_pitch(factor, samples, hz):
    sine = (0.5 * np.sin(2 * np.pi * 200 * np.arange(SR) / SR)).astype(np.float32)
    out = A.speed_perturb(sine, factor, SR)
    assert out.dtype == np.float32 and len(out) == samples
    assert peak_hz(out) == pytest.approx(hz, abs=0.5)
    # sox speed plays faster: the pitch is multiplied by the factor (1.1 -> 220 Hz, 0.9 -> 180 Hz)
    np.testing.assert_array_equal(A.speed_perturb(sine, 1.0), sine)
    with pytest.raises(ValueError):
        A.speed_perturb(sine, 0.0)


# --- SpecAugment masks ------------------------------------------------------------------------------------------

def runs(flags):
    """(start, length) of each run of True."""
    edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    return list(zip(starts, ends - starts))


def masked(crop, out):
    """Rows (frames) and columns (bands) set to the fill value, and that value (None when nothing was masked)."""
    values = np.unique(out[out != crop])
    assert len(values) <= 1                               # one fill value per crop ...
    if not len(values):
        return np.zeros(crop.shape[0], bool), np.zeros(crop.shape[1], bool), None
    fill = values[0]
    assert fill == pytest.approx(crop.astype(np.float64).mean(), abs=1e-6)   # ... its mean
    return np.all(out == fill, axis=1), np.all(out == fill, axis=0), fill


def test_masks_respect_count_and_width_and_leave_the_rest_unchanged():
    feats = rng(7).standard_normal((500, 160, 64)).astype(np.float32)
    before = feats.copy()
    out = A.mask_spectrogram(feats, rng(8), time_masks=2, max_time_width=20, freq_masks=3, max_freq_width=8)
    np.testing.assert_array_equal(feats, before)        # input untouched
    for crop, result in zip(feats, out):
        rows, cols, fill = masked(crop, result)
        assert len(runs(rows)) <= 2 and rows.sum() <= 40
        assert len(runs(cols)) <= 3 and cols.sum() <= 24
        keep = ~rows[:, None] & ~cols[None, :]
        np.testing.assert_array_equal(result[keep], crop[keep])
        assert np.all(result[~keep] == fill)
    assert max(masked(c, r)[0].sum() for c, r in zip(feats, out)) > 20      # two masks do add up


def test_mask_widths_span_zero_to_max_inclusive():
    feats = rng(9).standard_normal((2000, 50, 16)).astype(np.float32)
    out = A.mask_spectrogram(feats, rng(10), time_masks=1, max_time_width=7, freq_masks=0)
    spans = [runs(masked(f, o)[0]) for f, o in zip(feats, out)]
    assert all(len(s) <= 1 for s in spans)
    widths = [s[0][1] if s else 0 for s in spans]
    assert set(widths) == set(range(8))                 # 0..7, each width drawn
    starts = [s[0][0] for s in spans if s and s[0][1] == 7]
    assert min(starts) == 0 and max(starts) == 50 - 7    # anywhere the span fits
    cols = A.mask_spectrogram(feats[:50], rng(10), time_masks=0, freq_masks=1, max_freq_width=100)
    assert max(masked(f, o)[1].sum() for f, o in zip(feats, cols)) == 16     # width capped at the band count


def test_masks_on_a_batch_are_independent_per_item_and_deterministic():
    batch = rng(11).standard_normal((96, 160, 64, 1)).astype(np.float32)
    out = A.mask_spectrogram(batch, rng(12), 2, 20, 2, 8)
    assert out.shape == batch.shape and out.dtype == np.float32
    patterns = {(out[i, :, :, 0] != batch[i, :, :, 0]).tobytes() for i in range(96)}
    assert len(patterns) > 90
    np.testing.assert_array_equal(out, A.mask_spectrogram(batch, rng(12), 2, 20, 2, 8))
    assert not np.array_equal(out, A.mask_spectrogram(batch, rng(13), 2, 20, 2, 8))
    # a single crop gives the same as a batch of one
    np.testing.assert_array_equal(A.mask_spectrogram(batch[0, :, :, 0], rng(12), 2, 20, 2, 8),
                                  A.mask_spectrogram(batch[:1, :, :, 0], rng(12), 2, 20, 2, 8)[0])
    np.testing.assert_array_equal(A.mask_spectrogram(batch, rng(12), 0, 20, 0, 8), batch)
    with pytest.raises(ValueError, match="shape"):
        A.mask_spectrogram(batch[..., None], rng(), 1, 1, 1, 1)


# --- determinism ------------------------------------------------------------------------------------------------

def test_every_random_function_is_deterministic_per_seed():
    wav, other = speechlike(1.0, 0), speechlike(1.5, 1)
    calls = [
        lambda g: A.add_noise(wav, g, 10.0, "pink"),
        lambda g: A.add_babble(wav, [other, wav[::-1].copy()], g, 10.0, 2),
        lambda g: A.room_impulse_response(g),
        lambda g: A.mask_spectrogram(np.outer(wav[:160], wav[:64]), g, 2, 20, 2, 8),
        lambda g: A.augment_utterance(wav, A.AugmentSettings(copies=1), g, [other]),
    ]
    for call in calls:
        np.testing.assert_array_equal(call(rng(21)), call(rng(21)))
        assert not np.array_equal(call(rng(21)), call(rng(22)))


def test_augment_utterance_uses_every_enabled_kind():
    wav, pool = speechlike(1.0, 0), [speechlike(1.2, 1), speechlike(0.8, 2)]
    settings = A.AugmentSettings(copies=1, kinds=("noise", "babble", "reverb"))
    outs = [A.augment_utterance(wav, settings, A.rng_for(settings.seed, f"u{i}"), pool) for i in range(30)]
    assert all(o.shape == wav.shape and o.dtype == np.float32 and np.abs(o).max() <= 1 for o in outs)
    # reverb keeps the RMS exactly; noise and babble add power at 5..20 dB SNR
    gain = [10 * np.log10(np.mean(o.astype(np.float64) ** 2) / np.mean(wav.astype(np.float64) ** 2))
            for o in outs]
    assert sum(abs(g) < 1e-4 for g in gain) >= 3 and sum(g > 0.03 for g in gain) >= 10
    with pytest.raises(ValueError, match="babble_pool"):
        A.augment_utterance(wav, A.AugmentSettings(kinds=("babble",)), rng(), [])
    only_reverb = A.augment_utterance(wav, A.AugmentSettings(kinds=("reverb",)), rng(3))
    assert snr_db(wav, only_reverb) < 10


# --- settings ---------------------------------------------------------------------------------------------------

DEFAULTS = dict(speed_perturb=False, copies=0, kinds=["noise", "babble", "reverb"], snr_db=[5, 20],
                babble_talkers=[3, 6], rt60=[0.2, 0.8], seed=11, time_masks=0, time_mask_frames=20, freq_masks=0,
                freq_mask_bands=8)


def settings(**overrides):
    return A.AugmentSettings.from_section(Params({"augment": {**DEFAULTS, **overrides}}).section("augment"))


def masks(**overrides):
    return A.MaskSettings.from_section(Params({"augment": {**DEFAULTS, **overrides}}).section("augment"))


def test_repo_params_have_augmentation_off():
    section = load_params(REPO / "params.yaml").section("augment")
    s, m = A.AugmentSettings.from_section(section), A.MaskSettings.from_section(section)
    assert s == A.AugmentSettings() == settings() and m == A.MaskSettings() == masks()
    assert s.copies == 0 and s.speed_factors == () and not m.masking
    feats = np.ones((10, 4), np.float32)
    assert m.mask(feats, rng()) is feats


def test_settings_are_typed():
    s = settings(speed_perturb=True, copies=2, kinds=["reverb"], snr_db=[0, 15.5], babble_talkers=4, rt60=0.5)
    assert s.speed_factors == (0.9, 1.1) and s.copies == 2 and s.kinds == ("reverb",)
    assert s.snr_db == (0.0, 15.5) and s.babble_talkers == (4, 4) and s.rt60 == (0.5, 0.5)
    m = masks(time_masks=2)
    assert m.masking and m.time_masks == 2 and m.freq_masks == 0
    with pytest.raises(Exception):
        s.copies = 3                                    # frozen


@pytest.mark.parametrize("override, message", [
    (dict(kinds=["noise", "echo"]), "augment.kinds: unknown value(s) ['echo']"),
    (dict(kinds=[], copies=2), "augment.kinds: empty, but copies is 2"),
    (dict(copies=-1), "augment.copies: must be >= 0"),
    (dict(speed_perturb="yes"), "augment.speed_perturb: expected true or false"),
    (dict(snr_db=[20, 5]), "augment.snr_db: low must be <= high"),
    (dict(snr_db="loud"), "augment.snr_db: expected [low, high] (numbers)"),
    (dict(snr_db=[1, 2, 3]), "augment.snr_db: expected [low, high]"),
    (dict(babble_talkers=[0, 3]), "augment.babble_talkers: must be >= 1"),
    (dict(babble_talkers=[2.5, 3]), "augment.babble_talkers: expected [low, high] (integers)"),
    (dict(rt60=[0.0, 0.5]), "augment.rt60: must be >= 0.05"),
    (dict(time_masks=1.5), "augment.time_masks: expected an integer"),
    (dict(freq_mask_bands=0), "augment.freq_mask_bands: must be >= 1"),
    (dict(seed=None), "augment.seed: expected an integer"),
])
def test_settings_errors_name_the_key(override, message):
    with pytest.raises(ParamsError) as err:
        settings(**override)
        masks(**override)
    assert message in str(err.value)


def test_missing_key_is_named():
    values = dict(DEFAULTS)
    del values["rt60"]
    with pytest.raises(ParamsError, match="augment.rt60: missing"):
        A.AugmentSettings.from_section(Params({"augment": values}).section("augment"))
