"""Benchmarks of the model layer, each against a baseline measured side by side in the same process.

`python -m bench` runs the CPU ones (sampler, self-VQA scoring, training step) on a random-weight mid-size Janus
and prints one JSON line per benchmark; `bench/gpu.sh` runs the Janus-Pro-1B/7B-sized ones on a GPU machine.
Figures and the commands that produced them are in bench/RESULTS.md. Never part of the test suite.
"""
