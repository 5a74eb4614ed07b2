"""Shared fixtures: tiny models of every kind, and a NumPy restatement of
each method's formula for the adapter contract."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_lowrank  # noqa: E402,F401

BACKEND = keras.backend.backend()


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


# ----------------------------------------------------------------------
# Small layers for the numerics checks.
# Dense: 5 -> 6 with tanh; EinsumDense "btd,ndh->btnh" with kernel (n=2, d=5,
# h=3), so its matrix view is 5 x 6 with the kernel axes permuted.
DENSE_X = np.random.RandomState(0).normal(size=(3, 5)).astype("float32")
EINSUM_X = np.random.RandomState(1).normal(size=(2, 4, 5)).astype("float32")


def dense_model():
    inp = keras.Input((5,))
    out = keras.layers.Dense(6, activation="tanh", name="target")(inp)
    return keras.Model(inp, out)


def einsum_model():
    inp = keras.Input((4, 5))
    out = keras.layers.EinsumDense(
        "btd,ndh->btnh", output_shape=(4, 2, 3), bias_axes="nh", name="target"
    )(inp)
    return keras.Model(inp, out)


SMALL = {"dense": (dense_model, DENSE_X), "einsum": (einsum_model, EINSUM_X)}


# A three-layer MLP (Dense, EinsumDense, head) and a regression batch: the
# training-dynamics tests train it a few steps at a time.
MLP_X = np.random.RandomState(0).normal(size=(8, 5)).astype("float32")
MLP_Y = np.random.RandomState(1).normal(size=(8, 3)).astype("float32")


def mlp_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="tanh", name="ffn")(inp)
    h = keras.layers.EinsumDense("bd,dk->bk", output_shape=(6,), bias_axes="k", name="proj")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))


def tunable(adapter):
    """The variables an adapter trains: its own and the model-level ones it
    reads (LoRA-drop's tied pair)."""
    return list(adapter.trainable_variables) + [v for v in adapter.linked_variables() if v.trainable]


def perturb(adapter, scale=0.3, seed=0):
    """Move every trainable variable off its no-op start."""
    rng = np.random.RandomState(seed)
    for v in tunable(adapter):
        value = rng.normal(scale=scale, size=tuple(v.shape)).astype("float32")
        if v.name == "magnitude":
            value = np.abs(value) + 0.5
        v.assign(value)


# ----------------------------------------------------------------------
# Independent NumPy statement of the matrix view and of every method.
def np_matricize(equation, kernel):
    inp, rest = equation.split(",")
    ker, out = rest.split("->")
    inp, out = inp.replace("...", ""), out.replace("...", "")
    red = [c for c in ker if c in inp and c not in out]
    prod = [c for c in ker if c in out and c not in inp]
    perm = [ker.index(c) for c in red + prod]
    n_in = int(np.prod([kernel.shape[ker.index(c)] for c in red]))
    w = np.transpose(kernel, perm).reshape(n_in, -1)

    def back(m):
        shape = [kernel.shape[i] for i in perm]
        return np.transpose(m.reshape(shape), np.argsort(perm))

    return w, back


def _v(adapter, name):
    return to_np(adapter._adapter_vars[name]).astype("float64")


def factor_a(adapter, name="lora_a"):
    """`A` in Keras layout (n_in, r); the variable stores `Aᵀ` (r, n_in)."""
    return np.swapaxes(_v(adapter, name), -1, -2)


def _col_norm(m):
    return np.sqrt((m**2).sum(axis=0))


def ref_lora(adapter, w):
    return w + adapter.scaling * factor_a(adapter) @ _v(adapter, "lora_b")


def ref_dora(adapter, w):
    v = w + adapter.scaling * factor_a(adapter) @ _v(adapter, "lora_b")
    return _v(adapter, "magnitude")[None, :] * v / _col_norm(v)[None, :]


def ref_dylora(adapter, w):
    """spec §4: K + (alpha/ℓ) A[:, :ℓ] B[:ℓ] at the inference rank ℓ."""
    ell = adapter.eval_rank()
    a = factor_a(adapter)[:, :ell]
    return w + (adapter.alpha / ell) * a @ _v(adapter, "lora_b")[:ell]


def ref_vera(adapter, w):
    """spec §9: K + A diag(d) B diag(b), A and B sliced from the shared pair."""
    n_in, n_out = w.shape
    a = to_np(adapter.shared_state().vera_a).astype("float64")[:n_in]
    b = to_np(adapter.shared_state().vera_b).astype("float64")[:, :n_out]
    d = _v(adapter, "vera_lambda_d")
    bv = _v(adapter, "vera_lambda_b")
    return w + (a * d[None, :]) @ b * bv[None, :]


def ref_lora_fa(adapter, w):
    """spec §3: K + s A B (A frozen; the layer is LoRA's)."""
    return ref_lora(adapter, w)


def ref_delta_lora(adapter, w):
    """spec §7: K_t + s A B with K_t = K + λ s (A B − A_start B_start) once
    the step count is past start_step."""
    ab = factor_a(adapter) @ _v(adapter, "lora_b")
    out = w + adapter.scaling * ab
    steps = int(to_np(adapter.shared_state().steps))
    if steps > adapter.start_step:
        ab0 = factor_a(adapter, "delta_a0") @ _v(adapter, "delta_b0")
        out = out + adapter.update_ratio * adapter.scaling * (ab - ab0)
    return out


def ref_adalora(adapter, w):
    """spec §6: K + c A diag(λ) B, c = alpha / (r + 1e-5)."""
    c = adapter.alpha / (adapter.rank + 1e-5)
    return w + c * (factor_a(adapter) * _v(adapter, "lora_e")[..., None, :]) @ _v(adapter, "lora_b")


def ref_lora_drop(adapter, w):
    """spec §12: K + s A B with the layer's own pair or its shape's tied pair."""
    a_t, b = (to_np(v).astype("float64") for v in adapter.pair())
    return w + adapter.scaling * np.swapaxes(a_t, -1, -2) @ b


def ref_loha(adapter, w):
    """spec §10: K + s (P1 Q1) ⊙ (P2 Q2), P = Aᵀ."""
    p1, p2 = factor_a(adapter, "loha_a1"), factor_a(adapter, "loha_a2")
    q1, q2 = _v(adapter, "loha_b1"), _v(adapter, "loha_b2")
    return w + adapter.scaling * (p1 @ q1) * (p2 @ q2)


def ref_lokr(adapter, w):
    """spec §11: K + s kron(F1, F2), each factor full or Aᵀ B."""
    names = adapter._adapter_vars

    def factor(i):
        if f"lokr_f{i}" in names:
            return _v(adapter, f"lokr_f{i}")
        return factor_a(adapter, f"lokr_a{i}") @ _v(adapter, f"lokr_b{i}")

    return w + adapter.scaling * np.kron(factor(1), factor(2))


def ref_svf(adapter, w):
    """spec §14 (paper form): K + U diag(σ ⊙ (z - 1)) Vᵀ."""
    u, s, v, z = (_v(adapter, n) for n in ("svf_u", "svf_s", "svf_v", "svf_z"))
    return w + (u * (s * (z - 1.0))[None, :]) @ v.T


def ref_svft(adapter, w):
    """spec §15: K + sigmoid(g) U M_Ω Vᵀ, repeated positions adding up."""
    u, v, m = _v(adapter, "svft_u"), _v(adapter, "svft_v"), _v(adapter, "svft_m")
    rows, cols = to_np(adapter._adapter_vars["svft_index"])
    dense = np.zeros((u.shape[1], u.shape[1]))
    np.add.at(dense, (rows, cols), m)
    gate = 1.0 / (1.0 + np.exp(-_v(adapter, "svft_gate")[0]))
    return w + gate * u @ dense @ v.T


def ref_lora_xs(adapter, w):
    """spec §18: K + s A_f R B_f."""
    return w + adapter.scaling * _v(adapter, "xs_a") @ _v(adapter, "xs_r") @ _v(adapter, "xs_b")


def ref_svd_training(adapter, w):
    """spec §19: K_res + U_q diag(σ) V_qᵀ (K_res is the layer's frozen kernel)."""
    u, s, v = _v(adapter, "st_u"), _v(adapter, "st_s"), _v(adapter, "st_v")
    return w + (u * s[None, :]) @ v.T


# Each registered method must have an entry here: the contract fails for a
# method without its NumPy statement.
REFERENCE_MERGED = {
    "lora": ref_lora,
    "loraplus": ref_lora,  # LoRA's layer; LoRA+ changes the optimizer only
    "dora": ref_dora,
    "dylora": ref_dylora,
    "pissa": ref_lora,  # K_res + s A B; K_res is the layer's own frozen kernel
    "olora": ref_lora,  # the same, from a QR init
    "vera": ref_vera,
    "milora": ref_lora,  # K_p + s A B from the minor triplets
    "svf": ref_svf,
    "svft": ref_svft,
    "lora_xs": ref_lora_xs,
    "svd_training": ref_svd_training,
    "lora_drop": ref_lora_drop,
    "lora_fa": ref_lora_fa,
    "delta_lora": ref_delta_lora,
    "adalora": ref_adalora,
    "loha": ref_loha,
    "lokr": ref_lokr,
}


#: the SVD-family methods: each fine-tunes a pretrained KerasHub Gemma in
#: tests/test_svd_family.py
SVD_FAMILY = ("milora", "lora_xs", "svf", "svft", "svd_training")


def families():
    """One method per family (module of keras_lowrank.methods): the
    end-to-end KerasHub flows run once per family, the contract on small
    layers for every method."""
    from keras_lowrank import registry

    out = {}
    for name in sorted(keras_lowrank.methods()):
        module = registry.get(name).layer_class.__module__
        out.setdefault(module, name)
    return sorted(out.values())


def np_layer_output(adapter, x, merged_matrix_fn):
    """Output of the adapted layer restated in NumPy from its own variables."""
    from keras_lowrank import bases

    kernel = to_np(bases.read_kernel(adapter.layer)).astype("float64")
    eq = adapter.geometry.equation
    w, back = np_matricize(eq, kernel)
    k2 = back(merged_matrix_fn(adapter, w))
    y = np.einsum(eq, x.astype("float64"), k2)
    if adapter.layer.bias is not None:
        y = y + to_np(adapter.layer.bias)
    name = keras.activations.serialize(adapter.activation)
    if name == "tanh":
        y = np.tanh(y)
    elif name not in ("linear", None):
        raise AssertionError(f"test restates linear/tanh only, got {name}")
    return y


# ----------------------------------------------------------------------
# Tiny KerasHub models (spec/keras-notes §4.4)
def hub():
    import keras_hub

    return keras_hub


def gemma_backbone(vocab=20):
    return hub().models.GemmaBackbone(
        vocabulary_size=vocab, num_layers=2, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=4,
    )


def llama_backbone():
    return hub().models.LlamaBackbone(
        vocabulary_size=10, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=8, intermediate_dim=8,
    )


def bert_backbone():
    return hub().models.BertBackbone(
        vocabulary_size=10, num_layers=2, num_heads=2, hidden_dim=4,
        intermediate_dim=8, max_sequence_length=8,
    )


def gpt2_backbone():
    return hub().models.GPT2Backbone(
        vocabulary_size=10, num_layers=2, num_heads=2, hidden_dim=4,
        intermediate_dim=8, max_sequence_length=8,
    )


def token_inputs(vocab, batch=2, seq=8, segment=False, seed=0):
    rng = np.random.RandomState(seed)
    x = {
        "token_ids": rng.randint(0, vocab, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }
    if segment:
        x["segment_ids"] = np.zeros((batch, seq), "int32")
    return x


def needs(method):
    """The options a method cannot go without (its registry's
    `example_options`, e.g. AdaLoRA's `total_steps`)."""
    from keras_lowrank import registry

    return dict(registry.get(method).example_options)
