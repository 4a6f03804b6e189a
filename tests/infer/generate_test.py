"""KV-cache generation: equals full-recompute decoding; sampling filters, seeds, stops, eos, budgets; sharding."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import sharding
from fmjax.infer import generate, naive_sample
from fmjax.models.decoder import DecoderConfig, DecoderLM, init_cache

CFG = DecoderConfig(vocab_size=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)
EOS, PAD = 3, 0
LENGTHS = (1, 6, 19, 3)  # 19 real tokens spill into a second 16-token prompt bucket


class CharTokenizer:
    """ids 4.. are characters; pad 0, bos 2, eos 3 as in fmjax.data.tokenizer."""
    pad_id, bos_id, eos_id = 0, 2, 3

    def encode(self, text):
        return [4 + ord(c) % 60 for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + (i - 4) % 26) for i in ids)


def abstract_params(model):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


def init(cfg=CFG):
    """The model and random parameters (drawn in numpy: compiling model.init costs more than the tests)."""
    model = DecoderLM(cfg)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == "scale":  # RMSNorm
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype)  # ~1/sqrt(width)

    return model, jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(model)))


def prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(4, CFG.vocab_size, n - 1).tolist() for n in lengths]


def naive_greedy(model, params, prompt_ids, steps):
    lengths = np.array([len(p) for p in prompt_ids], np.int32)
    buf = naive_sample.left_aligned(prompt_ids, int(lengths.max()) + steps, PAD)
    out = np.asarray(naive_sample.generate_buffer(model, params, buf, lengths, jax.random.PRNGKey(0),
                                                  steps=steps, temperature=0.0))
    new = [out[r, n:n + steps].tolist() for r, n in enumerate(lengths)]
    return [ids[:ids.index(EOS)] if EOS in ids else ids for ids in new]


def gen(model, params, prompt_ids, steps=10, **kw):
    return generate.generate_ids(model, params, prompt_ids, max_new_tokens=steps, eos_id=EOS, pad_id=PAD, **kw)


# Most tests share one batch shape (4 rows, a 32-token prompt block, 16 new tokens) and one
# model, so prefill and decode compile once for the file.
@pytest.mark.parametrize("changes", [dict(remat="full"), dict(scan_layers=False, n_kv_heads=4)])
def test_greedy_kv_cache_equals_full_recompute_for_prompts_of_different_lengths(changes):
    model, params = init(dataclasses.replace(CFG, **changes))
    ids = prompts()
    assert gen(model, params, ids, 12) == naive_greedy(model, params, ids, 12)


def test_decode_mode_matches_the_full_forward_and_left_padding_stays_finite():
    model, params = init()
    ids = prompts((9,))[0]
    pad = 5
    slots = jnp.arange(pad + 6)[None]

    @jax.jit
    def run(params):
        full_1xLxV = model.apply({"params": params}, jnp.asarray([ids]))
        prefill_1xPxV, variables = model.apply(
            {"params": params, "cache": init_cache(model, 1, 16)}, jnp.asarray([[PAD] * pad + ids[:6]]),
            jnp.maximum(slots - pad, 0), (slots >= pad).astype(jnp.int32), decode=True, mutable=["cache"])
        steps = []
        for t in range(6, 9):
            logits_1x1xV, variables = model.apply(
                {"params": params, **variables}, jnp.asarray([[ids[t]]]), jnp.asarray([[t]]),
                jnp.ones((1, 1), jnp.int32), decode=True, mutable=["cache"])
            steps.append(logits_1x1xV[0, 0])
        return full_1xLxV[0], prefill_1xPxV[0], jnp.stack(steps), variables["cache"]

    full, prefill, steps, cache = run(params)
    assert np.isfinite(np.asarray(prefill)).all()  # padding queries see only padding, never nothing
    np.testing.assert_allclose(prefill[pad:], full[:6], atol=1e-5)
    np.testing.assert_allclose(steps, full[6:9], atol=1e-5)
    np.testing.assert_array_equal(cache["layers"]["attn"]["cache_index"], [pad + 9] * CFG.n_layers)


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    model, params = init()
    ids = prompts()
    greedy = gen(model, params, ids)
    assert gen(model, params, ids, temperature=1.0, top_k=1, seed=3) == greedy
    assert gen(model, params, ids, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_seeds_fix_samples_and_a_row_does_not_depend_on_the_others():
    model, params = init()
    ids = prompts()
    a = gen(model, params, ids, 16, temperature=1.0, seed=1)
    assert a == gen(model, params, ids, 16, temperature=1.0, seed=1)
    assert a != gen(model, params, ids, 16, temperature=1.0, seed=2)
    # One seed per prompt and per-row settings (row 3 greedy): a row's tokens stay the same in
    # another place of a batch with other neighbours.
    settings = dict(temperature=[1.0, 1.0, 0.7, 0.0], top_k=[0, 5, 0, 0], top_p=[1.0, 1.0, 0.9, 1.0],
                    seed=[11, 12, 13, 14])
    mixed = gen(model, params, ids, 16, **settings)
    assert mixed[3] == gen(model, params, ids, 16)[3]
    order = [2, 1, 3, 0]
    others = [ids[i] for i in order]
    others[3] = prompts((7,), seed=5)[0]
    moved = gen(model, params, others, 16, **{k: [v[i] for i in order] for k, v in settings.items()})
    assert moved[:3] == [mixed[i] for i in order[:3]]


def feed(tokens, max_new=10, stops=(), eos=EOS):
    """generate.record applied to a fixed token sequence (one row): the cut logic without a model."""
    requests = generate.Requests(
        temperature_B=np.zeros(1, np.float32), top_k_B=np.zeros(1, np.int32), top_p_B=np.ones(1, np.float32),
        key_B=np.zeros((1, 2), np.uint32), max_new_B=np.array([max_new], np.int32),
        eos_B=np.array([eos], np.int32), stops_BxSxM=generate.stop_array(stops, 1))
    zeros = jnp.zeros((1,), jnp.int32)
    state = generate.DecodeState(
        cache={}, step=jnp.zeros((), jnp.int32), prompt_len_B=zeros, token_B=zeros,
        tokens_BxN=jnp.zeros((1, len(tokens)), jnp.int32),
        recent_BxM=jnp.full((1, requests.stops_BxSxM.shape[-1]), -1, jnp.int32),
        done_B=jnp.asarray(requests.max_new_B <= 0), length_B=zeros, stop_len_B=zeros)
    for token in tokens:
        state = generate.record(state, jnp.asarray([token], jnp.int32), requests)
    return generate.new_tokens_of(state, 1)[0], generate.new_tokens_of(state, 1, keep_stop=True)[0]


def test_eos_stop_sequences_and_budgets_cut_the_output():
    assert feed([5, 6, 7, 3, 8]) == ([5, 6, 7], [5, 6, 7])  # eos: excluded
    assert feed([5, 6, 7, 8], stops=[[6, 7]]) == ([5], [5, 6, 7])  # a stop sequence: excluded
    assert feed([5, 6, 7, 8], stops=[[9], [7], [6, 7]]) == ([5], [5, 6, 7])  # the longest match goes
    assert feed([6, 5, 6, 5], stops=[[5, 6, 5]]) == ([6], [6, 5, 6, 5])
    assert feed([5, 3, 6, 7], stops=[[6, 7]]) == ([5], [5])  # nothing after the first end counts
    assert feed([5, 6, 7, 8], max_new=2) == ([5, 6], [5, 6])
    assert feed([5, 6, 7, 8], max_new=0) == ([], [])
    assert feed([5, 6, 7, 8], max_new=3, stops=[[6, 7]]) == ([5], [5, 6, 7])  # stop on the last token


def test_stop_ids_eos_and_max_new_tokens_end_real_generation():
    model, params = init()
    ids = prompts()
    greedy = gen(model, params, ids, 12)
    row = greedy[2]
    stop = row[4:6]
    first = next(i for i in range(len(row)) if row[i:i + 2] == stop)
    assert gen(model, params, ids, 12, stop_ids=[stop, [1, 1, 1]])[2] == row[:first]
    assert generate.generate_ids(model, params, ids, max_new_tokens=12, eos_id=row[5], pad_id=PAD)[2] == \
        row[:row.index(row[5])]
    assert gen(model, params, ids, [12, 0, 3, 7]) == [greedy[0], [], greedy[2][:3], greedy[3][:7]]


def test_text_generation_matches_the_naive_sampler_and_cuts_at_stop_strings():
    model, params = init()
    tokenizer = CharTokenizer()
    texts = ["ab", "hello", "the quick brown fox"]
    kv = generate.generate(model, params, tokenizer, texts, max_new_tokens=10)
    assert kv == naive_sample.sample(model, params, tokenizer, texts, 10, 0.0, jax.random.PRNGKey(0))
    continuation = kv[1][len(tokenizer.decode(tokenizer.encode("hello"))):]
    stop = continuation[3:5]
    cut = generate.generate(model, params, tokenizer, texts, max_new_tokens=10, stop=[stop, "zzzz"])[1]
    assert cut == kv[1][:len(kv[1]) - len(continuation)] + continuation[:continuation.index(stop)]


def test_bad_arguments_name_the_argument():
    model, params = init()
    for kw, name in [(dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                     (dict(top_k=[1, 2]), "top_k"), (dict(stop_ids=[[]]), "stop_ids")]:
        with pytest.raises(ValueError, match=name):
            gen(model, params, prompts((2, 3, 4)), **kw)
    with pytest.raises(ValueError, match="prompts"):
        gen(model, params, [[2], []])


def test_sharded_params_on_a_mesh_give_the_unsharded_tokens():
    model, params = init()
    ids = prompts()[:3]  # 3 prompts -> 4 rows, one per fsdp shard
    expected = gen(model, params, ids, 8)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    shardings = sharding.logical_shardings(abstract_params(model), mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert "tensor" in shardings["layers"]["attn"]["query"]["kernel"].spec
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert generate.batch_rows(3) == 4
        assert gen(model, sharded, ids, 8) == expected
