"""The whole model and its optimizer: parameter count, a float64 finite-difference check of the loss with respect
to every parameter tensor, forward and backward agreeing across backends and with the float64 oracle, Adam against
two steps worked out by hand, and the loss falling on a small learnable task."""

import functools
import math

import numpy as np
import pytest

from numba_cnn.kernels import reference
from conftest import backend_params, on_cuda_simulator
from replay import GivenDropout
from gradcheck import assert_directional_derivatives_match, assert_gradient_matches
from numba_cnn.kernels import Backend, get_backend
from numba_cnn.model import Model, default_network, init_params
from numba_cnn.network import build
from numba_cnn.network.layers import Conv2D, Dense, Flatten, MaxPool2D
from numba_cnn.optim import Adam

PARAM_SHAPES = default_network().param_shapes()

SEED, DROPOUT_SEED = 3, 5


def bar_images(rng, n):
    """Two classes of 28x28 images anyone can tell apart: class 0 a vertical bar, class 1 a horizontal one, each
    at a random place, over faint noise. Returns (float32 images (n, 1, 28, 28) in [0, 1], int64 labels)."""
    labels = rng.integers(0, 2, n)
    images = rng.uniform(0.0, 0.2, (n, 1, 28, 28))
    for image, label, at in zip(images, labels, rng.integers(4, 22, n)):
        if label == 0:
            image[0, 4:24, at:at + 3] = 1.0
        else:
            image[0, at:at + 3, 4:24] = 1.0
    return images.astype(np.float32), labels


def test_parameter_count():
    conv1, conv2, dense = 32 * 1 * 3 * 3 + 32, 64 * 32 * 3 * 3 + 64, 1600 * 10 + 10
    assert conv1 + conv2 + dense == 34_826
    assert Model("im2col").num_params == 34_826
    assert {name: p.shape for name, p in init_params(0).items()} == PARAM_SHAPES


def loss_at(model, params, x, labels):
    """The training loss at `params` (host arrays), the dropout rng re-seeded so every call draws the same mask."""
    model.load_state_dict(params)
    backend = model.backend
    logits = model.forward(backend.to_device(x), dropout_rng=backend.make_dropout_rng(DROPOUT_SEED))
    return backend.layers.softmax_cross_entropy(logits, backend.to_device(labels))[0]


# Each element of a small tensor is checked; of a large one, a random sample plus random directions.
ALL_ELEMENTS_UP_TO, SAMPLED_ELEMENTS = 32, 8


@pytest.mark.parametrize("backend_name", backend_params(("im2col", "jit")))
def test_model_gradient_matches_finite_differences(backend, rng):
    x, labels = bar_images(rng, 2)
    model = Model(backend, seed=SEED, dtype=np.float64)
    params = model.state_dict()
    model.forward_backward(backend.to_device(x.astype(np.float64)), backend.to_device(labels),
                           backend.make_dropout_rng(DROPOUT_SEED))
    grads = {name: np.asarray(backend.to_host(g)) for name, g in model.grads.items()}
    assert set(grads) == set(PARAM_SHAPES)
    x = x.astype(np.float64)
    for name, p in params.items():
        def loss_of(a, name=name):
            return loss_at(model, dict(params, **{name: a}), x, labels)

        indices = None if p.size <= ALL_ELEMENTS_UP_TO else rng.choice(p.size, SAMPLED_ELEMENTS, replace=False)
        assert_gradient_matches(grads[name], loss_of, p.copy(), indices, what=name)
        assert_directional_derivatives_match(grads[name], loss_of, p, what=name)


BATCH = 2  # naive spends about 3 s per image on a forward and backward pass


class RecordingDropout:
    """A backend's layers with dropout_forward recording each mask it draws (host copies), everything else as is."""

    def __init__(self, backend):
        self._layers, self._to_host, self.masks = backend.layers, backend.to_host, []

    def __getattr__(self, name):
        return getattr(self._layers, name)

    def dropout_forward(self, x, rate, rng):
        y, mask = self._layers.dropout_forward(x, rate, rng)
        self.masks.append(np.array(self._to_host(mask)))  # a copy: the arena reuses the mask once dropout is done
        return y, mask


def training_pass_on(backend, model):
    """One training pass over the fixed batch, written out as Model.forward_backward does it so the logits can be
    compared too: (logits, loss, gradients, dropout mask), all on the host."""
    x, labels = bar_images(np.random.default_rng(1), BATCH)
    recording = RecordingDropout(backend)
    backend.layers = recording  # `backend` is this test's own Backend object, not the registry's
    logits = model.forward(backend.to_device(x.astype(model.dtype)), backend.make_dropout_rng(DROPOUT_SEED))
    loss, dlogits, _ = recording.softmax_cross_entropy(logits, backend.to_device(labels))
    grads = {name: np.asarray(backend.to_host(g)) for name, g in model.backward(dlogits).items()}
    (mask,) = recording.masks
    return np.asarray(backend.to_host(logits)), loss, grads, mask


@functools.lru_cache(maxsize=None)
def training_pass(backend_name):
    """A float32 Model(seed=SEED) on `backend_name`, one training pass (cached: naive's pass is the slow part of
    this file and two tests read it)."""
    registered = get_backend(backend_name)
    backend = Backend(backend_name, registered.module)
    return training_pass_on(backend, Model(backend, seed=SEED))


def oracle_training_pass(dropout_mask):
    """The same pass in float64 through the oracle's kernels (numba_cnn/kernels/reference.py) and numpy layers, with the
    dropout mask the backend under test drew."""
    backend = Backend("reference", reference)
    backend.layers = GivenDropout(dropout_mask.astype(np.float64))
    return training_pass_on(backend, Model(backend, dtype=np.float64, params=init_params(SEED)))


def test_model_matches_the_float64_oracle(backend_name):
    if on_cuda_simulator(backend_name):
        pytest.skip("cuda on the simulator: this batch is millions of simulated CUDA threads (many minutes); "
                    "test_cuda.py checks a small network's model step against the oracle here, and a GPU runs this one")
    logits, loss, grads, mask = training_pass(backend_name)
    expected_logits, expected_loss, expected_grads, _ = oracle_training_pass(mask)
    assert 0.3 < np.mean(mask > 0) < 0.7 and set(np.unique(mask)) <= {0.0, 2.0}  # a real rate-0.5 mask
    reference.assert_close(logits, expected_logits, np.float32, f"{backend_name} logits")
    assert loss == pytest.approx(expected_loss, rel=reference.FLOAT32_TOL)
    for name, expected in expected_grads.items():
        assert grads[name].dtype == np.float32
        reference.assert_close(grads[name], expected, np.float32, f"{backend_name} d{name}")


def naive_pass_replaying(mask):
    """naive's training pass with a given dropout mask (jit draws its own, from Philox)."""
    backend = Backend("naive", get_backend("naive").module)
    backend.layers = GivenDropout(mask)
    return training_pass_on(backend, Model(backend, seed=SEED))


@pytest.mark.parametrize("other", ["im2col", "jit"])
def test_backends_agree_on_the_first_batch(other):
    """Same seed, same batch, same dropout mask: naive's loss and gradients are im2col's (and jit's) to float32
    rounding. naive and im2col draw the same mask from numpy's generator; jit draws its own, which naive replays."""
    _, other_loss, other_grads, other_mask = training_pass(other)
    if other == "jit":
        _, naive_loss, naive_grads, naive_mask = naive_pass_replaying(other_mask)
    else:
        _, naive_loss, naive_grads, naive_mask = training_pass("naive")
    np.testing.assert_array_equal(naive_mask, other_mask)
    assert naive_loss == pytest.approx(other_loss, rel=reference.FLOAT32_TOL)
    for name in PARAM_SHAPES:
        reference.assert_close(naive_grads[name], other_grads[name], np.float32, f"naive vs {other}: d{name}")


def keras_adam_by_hand(p0, grads, lr, beta1, beta2, eps):
    """Parameter values after each Adam step, element by element in Python floats, as Keras 3 writes the update:
    m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2;
    p -= lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)."""
    p, m, v, history = list(p0), [0.0] * len(p0), [0.0] * len(p0), []
    for t, g in enumerate(grads, start=1):
        alpha = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        for i, gi in enumerate(g):
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            v[i] = beta2 * v[i] + (1 - beta2) * gi * gi
            p[i] = p[i] - alpha * m[i] / (math.sqrt(v[i]) + eps)
        history.append((list(p), list(m), list(v)))
    return history


def test_adam_matches_two_steps_by_hand(backend):
    lr, beta1, beta2, eps = 0.01, 0.9, 0.999, 1e-7
    p0 = [0.5, -1.0, 2.0, 0.25, 1.0]
    # The last gradient is so small that eps (added to sqrt(v), which is then ~3e-8) damps its step.
    grads = [[0.3, -2.0, 0.0, 0.05, 1e-6], [-0.1, -1.0, 0.5, 0.05, 1e-6]]
    to_device = backend.to_device
    params = {"p": to_device(np.array(p0, dtype=np.float32))}
    adam = Adam(params, backend, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    expected = keras_adam_by_hand(p0, grads, lr, beta1, beta2, eps)
    for step, g in enumerate(grads):
        adam.step({"p": to_device(np.array(g, dtype=np.float32))})
        p, m, v = expected[step]
        np.testing.assert_allclose(backend.to_host(params["p"]), p, rtol=1e-6, err_msg=f"step {step + 1}: p")
        np.testing.assert_allclose(backend.to_host(adam.m["p"]), m, rtol=1e-6, err_msg=f"step {step + 1}: m")
        np.testing.assert_allclose(backend.to_host(adam.v["p"]), v, rtol=1e-5, err_msg=f"step {step + 1}: v")
        if step == 0:  # Adam's first step moves a parameter by lr against its gradient's sign, unless eps damps it
            np.testing.assert_allclose(np.subtract(p, p0)[:4], [-lr, lr, 0.0, -lr], rtol=1e-4)
            assert 0 < p0[4] - p[4] < 0.5 * lr
    assert adam.iterations == 2


def test_loss_falls_on_a_learnable_task():
    rng = np.random.default_rng(0)
    backend = get_backend("im2col")
    model = Model(backend, seed=0)
    adam = Adam(model.params, backend, lr=3e-3)
    dropout_rng = backend.make_dropout_rng(0)
    losses = []
    for _ in range(30):
        x, labels = bar_images(rng, 16)
        loss, _ = model.forward_backward(x, labels, dropout_rng)
        adam.step(model.grads)
        losses.append(loss)
    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[:3]) > 1.5  # ten classes, untrained: about log(10) = 2.3
    # log 2 = 0.69 is all a model gets from knowing that only two of its ten classes occur; below 0.4 it has
    # learned to tell the bars apart.
    assert np.mean(losses[-5:]) < 0.4
    x, labels = bar_images(rng, 64)
    assert np.mean(model.predict(x) == labels) > 0.9


def test_the_model_owns_the_arrays_its_passes_return():
    """jit's ops return the buffers of an arena the Model owns, released when the next pass begins: two training
    steps give bitwise the results of a model whose ops allocate fresh arrays, the second step reuses the first
    one's memory, and arrays handed to the caller (logits, gradients) are never the arena's."""
    rng = np.random.default_rng(SEED)
    network = build([Conv2D(8, 3, padding="same", activation="relu"), MaxPool2D(2), Conv2D(8, 3, activation="relu"),
                     Flatten(), Dense(10, activation="softmax")], (3, 12, 12))
    images, labels = rng.standard_normal((6, 3, 12, 12)).astype(np.float32), rng.integers(0, 10, 6)
    owning, fresh = Model("jit", seed=SEED, network=network), Model("jit", seed=SEED, network=network)
    assert owning._arena is not None
    fresh._arena = None
    results = {}
    for name, model in (("owning", owning), ("fresh", fresh)):
        out = []
        for step in range(2):
            rng_step = np.random.default_rng(step)
            loss, _ = model.forward_backward(images, labels, rng_step)
            out.append((loss, {k: g.copy() for k, g in model.grads.items()}))
            if name == "owning" and step == 0:
                held = owning._arena.nbytes
                first = model.forward(images)
                kept = first.copy()
                second = model.forward(images[::-1].copy())  # another pass: first must come through unchanged
        results[name] = out
    assert held > 0 and owning._arena.nbytes == held  # the second step took the first one's buffers again
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)
    # the same images in reverse order give the same logits within rounding: numpy's matmul (the dense layer) may
    # round a row differently by its place in the batch (OpenBLAS's tail rows on some CPUs)
    np.testing.assert_allclose(second[::-1], first, rtol=1e-5, atol=1e-6)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(results["owning"], results["fresh"]):
        assert loss_a == loss_b
        for key in grads_a:
            np.testing.assert_array_equal(grads_a[key], grads_b[key])


@pytest.mark.parametrize("preset, spared", [("vgg-small", 4 * 64 * 16 * 16 * 4), ("vgg-small-bn", 4 * 32 * 32 * 32 * 4)])
def test_donated_gradients_change_no_bit_and_spare_the_arena_a_buffer(monkeypatch, preset, spared):
    """The Model donates each step's input gradient to the step before it: vgg-small's conv3 writes its ReLU'd
    gradient over it, vgg-small-bn's first batch norm its input gradient, instead of a buffer of their own (4
    images of 64 x 16 x 16, of 32 x 32 x 32). The gradients are bitwise those of a model that donates nothing, and
    its arena holds at least that buffer less where it frees nothing within a pass (where it does, the buffer that
    donation spares may come from a dead activation instead, at the cost of a pass over more memory)."""
    from numba_cnn.kernels.jit import buffers
    from numba_cnn.network import from_dict, preset_document

    network = from_dict(preset_document(preset), input_shape=(3, 32, 32))
    rng = np.random.default_rng(SEED)
    images, labels = rng.standard_normal((4, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 4)

    def train_step():
        model = Model("jit", seed=SEED, network=network)
        model.forward_backward(images, labels, np.random.default_rng(1))
        return model.grads, model._arena.nbytes

    monkeypatch.setattr(buffers.OutputArena, "retire", lambda self, kept: None)
    grads, nbytes = train_step()
    monkeypatch.setattr(buffers.OutputArena, "donate", lambda self, a: None)
    grads_kept, nbytes_kept = train_step()
    assert grads.keys() == grads_kept.keys()
    for key in grads:
        np.testing.assert_array_equal(grads[key], grads_kept[key])
    assert nbytes_kept - nbytes >= spared


@pytest.mark.parametrize("preset", ["vgg-small", "vgg-small-bn"])
def test_a_steady_training_step_allocates_no_buffers(monkeypatch, preset):
    """After two steps, a training step of the VGG-style presets takes every buffer of the jit backend (scratch,
    arena, layout copies) from those the steps before made: none is allocated again (each would cost a page fault
    per 4 KiB). vgg-small's step uses more scratch buffers than a small network, the lists of two fused layers;
    vgg-small-bn's hands activations and gradients between layouts (batch norm, unfused max-pooling, Flatten)."""
    from numba_cnn.kernels.jit import buffers
    from numba_cnn.network import from_dict, preset_document

    network = from_dict(preset_document(preset), input_shape=(3, 32, 32))
    model = Model("jit", seed=SEED, network=network)
    rng = np.random.default_rng(SEED)
    images, labels = rng.standard_normal((4, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 4)
    made = []
    allocate = buffers.aligned_empty
    monkeypatch.setattr(buffers, "aligned_empty", lambda shape, dtype: made.append(shape) or allocate(shape, dtype))
    for step in range(3):
        made.clear()
        model.forward_backward(images, labels, np.random.default_rng(step))
    assert made == [], f"buffers allocated in a steady step: {made}"


@pytest.mark.parametrize("preset", ["vgg-small-bn", "lenet5", "every-kind"])
def test_the_backward_reuses_dead_activations_and_changes_no_bit(preset):
    """After each layer's backward the Model frees in its arena what no layer below reads (that layer's cache, the
    gradient it was given), and the gradients below take that memory. With every freed block filled with NaN the
    moment it is freed, two training steps (Adam between them) give bitwise the losses and gradients of a model
    whose ops allocate fresh arrays: nothing still read was freed. And the arena ends smaller than one that frees
    nothing within a pass."""
    from test_network import EVERY_KIND, EVERY_KIND_INPUT

    from numba_cnn.kernels.jit import buffers
    from numba_cnn.network import from_dict, preset_document

    document, shape = ((EVERY_KIND, EVERY_KIND_INPUT) if preset == "every-kind"
                       else (preset_document(preset), (3, 32, 32) if preset.startswith("vgg") else (1, 28, 28)))
    network = from_dict(document, input_shape=shape, num_classes=10)
    rng = np.random.default_rng(SEED)
    images, labels = rng.standard_normal((4, *shape)).astype(np.float32), rng.integers(0, 10, 4)

    def train(arena):
        model = Model("jit", seed=SEED, network=network)
        model._arena = arena
        optimizer = Adam(model.params, model.backend)
        out = []
        for step in range(2):
            loss, _ = model.forward_backward(images, labels, np.random.default_rng(step))
            out.append((loss, {key: g.copy() for key, g in model.grads.items()}))
            optimizer.step(model.grads)
        return out

    poisoned, holding = buffers.OutputArena(poison=True), buffers.OutputArena()
    holding.retire = lambda kept: None
    results = {"poisoned": train(poisoned), "fresh": train(None), "holding": train(holding)}
    for name in ("fresh", "holding"):
        for (loss_a, grads_a), (loss_b, grads_b) in zip(results["poisoned"], results[name]):
            assert loss_a == loss_b and np.isfinite(loss_a)
            assert grads_a.keys() == grads_b.keys()
            for key in grads_a:
                np.testing.assert_array_equal(grads_a[key], grads_b[key], err_msg=f"{name}: {key}")
    assert 0 < poisoned.nbytes < holding.nbytes


def test_an_arena_frees_what_its_owner_does_not_keep_and_merges_free_neighbours():
    """OutputArena.retire frees every block but those the owner keeps (`blocks_of` its arrays: a view of a block
    keeps it) and the layout copies of arrays in kept blocks; a later take reuses the freed memory, and once released
    the blocks merge: a buffer as large as all of them together comes from the same memory, with no new slab."""
    from numba_cnn.kernels.jit.buffers import ALIGNMENT, OutputArena

    arena = OutputArena()
    with arena:
        a, b, c = (arena.take((1000,), np.float32) for _ in range(3))  # 4000 bytes each: blocks of 4032
        copy = arena.layout(b, "a copy of b", lambda take: take((10,), np.float64))
        held = arena.nbytes
        assert held == 3 * 4032 + 128
        assert arena.blocks_of([np.zeros(3), a[:0]]) == set()  # not the arena's memory; no memory at all
        # a strided view of a keeps a's whole block; the copy keeps its own, but b is not kept, so neither is its entry
        arena.retire(arena.blocks_of([a[1::2].reshape(20, 25), copy]))
        d = arena.take((1000,), np.float32)  # b's block, the smallest free one that fits
        assert np.shares_memory(d, b) and not np.shares_memory(d, a) and arena.nbytes == held
        assert arena.layout(b, "a copy of b", lambda take: take((10,), np.float64)) is not copy  # b's copy dropped
        arena.retire(arena.blocks_of(b))
        e = arena.layout(b, "a copy of b", lambda take: take((10,), np.float64))
        arena.retire(arena.blocks_of(b))  # b kept: its copy too
        assert arena.layout(b, "a copy of b", lambda take: None) is e
        arena.release()
        whole = arena.take((held // 4,), np.float32)
        assert whole.ctypes.data % ALIGNMENT == 0 and np.shares_memory(whole, a) and np.shares_memory(whole, c)
        assert arena.nbytes == held
