"""The command-line tools, apart from the importable library (nothing in `p3o_jax` outside
this package imports it). Every tool takes the same `key=value` grammar (p3o_jax/config_args.py):

    python -m p3o_jax.cli.train        exp=toy algo=ppo rl.beta=0.1      (`make train`)
    python -m p3o_jax.cli.frontier     quick=true                        (`make frontier`)
    python -m p3o_jax.cli.compare      exp=smollm2 seeds=0,1             (`make compare`)
    python -m p3o_jax.cli.bench        only=machine,iteration layers=12  (`make bench`)
    python -m p3o_jax.cli.memory_plan  model=pythia-6.9b slice=v5e-16 mesh.tensor=2
    python -m p3o_jax.cli.export       run=runs/toy stage=p3o [step=N]   (an HF folder)
"""
