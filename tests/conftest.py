"""Test setup: every test sees 8 simulated CPU devices.

XLA reads XLA_FLAGS once, when the backend starts, so the flag is set here before
anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
