"""The command-line programs: absl flags and one call into the library each.

``python train.py`` (the checkout's scripts) and ``ddpm-train`` (the installed console scripts)
run the same ``main``; ``python -m ddpm_jax.fid|bpd|convert`` are the evaluation and interop
commands.
"""
