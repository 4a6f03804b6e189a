"""Every test runs on 8 fake CPU devices, with rank promotion an error."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after the flags above)

jax.config.update("jax_numpy_rank_promotion", "raise")
