"""Full-recompute sampling: greedy decoding picks the model's argmax at every step."""
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.infer import naive_sample
from fmjax.models.decoder import DecoderConfig, DecoderLM


class CharTokenizer:
    """ids 4.. are characters; pad 0, bos 2, eos 3 as in fmjax.data.tokenizer."""
    pad_id, bos_id, eos_id = 0, 2, 3

    def encode(self, text):
        return [4 + ord(c) % 60 for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + (i - 4) % 26) for i in ids)


def test_greedy_sampling_follows_the_argmax_of_each_prefix():
    model = DecoderLM(DecoderConfig(vocab_size=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    head_dim=8, mlp_dim=64))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tokenizer = CharTokenizer()
    prompts, steps = ["ab", "hello"], 5
    texts = naive_sample.sample(model, params, tokenizer, prompts, steps, 0.0, jax.random.PRNGKey(1))
    apply = jax.jit(model.apply)
    for prompt, text in zip(prompts, texts):
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        for _ in range(steps):
            logits = apply({"params": params}, jnp.asarray([ids]))
            next_id = int(np.argmax(logits[0, -1]))
            if next_id == tokenizer.eos_id:
                break
            ids.append(next_id)
        assert text == tokenizer.decode(ids[1:])
