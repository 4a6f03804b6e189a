"""Workdirs for tests that need a trained-looking run without training one."""
import json

import jax
import numpy as np

from fmjax.train import checkpoint, loop


def write_random_checkpoint(config, path, devices=None, step: int = 3):
    """A workdir as training leaves it (config.json, tokenizer.model, checkpoints/<step>) holding random
    parameters drawn in numpy (initialising through the model would compile more than the tests need);
    returns its Run."""
    run = loop.setup(config, str(path), devices)
    rng = np.random.default_rng(0)

    def draw(key_path, leaf):
        value = np.ones(leaf.shape) if key_path[-1].key == "scale" else 0.2 * rng.standard_normal(leaf.shape)
        return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

    state = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), run.abstract)
    state = state.replace(params=jax.tree_util.tree_map_with_path(draw, run.abstract.params))
    loop.write_config(config, str(path))
    ckpts = checkpoint.Checkpoints(str(path), keep=1)
    ckpts.save(step, state, {}, json.loads(config.to_json_best_effort()))
    ckpts.wait()
    ckpts.close()
    return run
