"""Every test runs on 8 fake CPU devices, with rank promotion an error."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after the flags above)

jax.config.update("jax_numpy_rank_promotion", "raise")

# Many tests compile the same functions again (a fresh task per run, the same shapes): a persistent
# compilation cache for the session turns those recompiles into loads. Results are unchanged.
import tempfile  # noqa: E402

# pytest-xdist workers of one run share it (same PYTEST_XDIST_TESTRUNUID): a function compiled by one
# worker is loaded by the others.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_CACHE = (os.path.join(tempfile.gettempdir(), f"fmjax-test-xla-cache-{_RUN}") if _RUN
          else tempfile.mkdtemp(prefix="fmjax-test-xla-cache-"))
os.makedirs(_CACHE, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
