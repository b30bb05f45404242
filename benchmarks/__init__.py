"""Benchmarks a user or maintainer reruns; a package, so that they import each other as `benchmarks.NAME` and
the library as `nrnn_jax`. Run each as a module from the repository root, with the package installed (`make
install`) or `PYTHONPATH=src`:

    python -m benchmarks.benchmark --shape paper             # train-step time of every backend and mode, with
                                                             # the eager-PyTorch baseline when torch is installed
    python -m benchmarks.benchmark_torch --compare           # the PyTorch baseline's formulations alone
    python -m benchmarks.step_breakdown --repeats 7          # where the time of one train step goes
    python -m benchmarks.cell_costs                          # the explicit regularizer's cost per cell and method
    python -m benchmarks.compare_revisions --rev main        # this checkout against another git revision
    python -m benchmarks.stress_data_parallel --processes 8  # long data-parallel CPU trainings, fresh processes
    python -m benchmarks.sweep_throughput                    # a sweep on 1 and N devices and over P processes

Each module's docstring describes its options and output. `scripts/gpu_benchmark.sh` runs `benchmarks.benchmark`
on an accelerator.
"""
