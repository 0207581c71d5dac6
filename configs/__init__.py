"""The configs, one ``get_config()`` per file; installed as ``ddpm_jax.configs``.

``train.py --config=configs/digits.py`` reads the file; outside a checkout the same name finds
the installed copy (``ddpm_jax.cli``), and ``from ddpm_jax.configs import digits`` imports it.
"""
