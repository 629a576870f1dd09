"""Data-parallel training: collectives, the rendezvous, the launcher, bucketed gradient reduction
and the sharded optimizer (ZeRO-1).

    group      the Group interface every backend implements, and the one-process SingleGroup
    env        who this process is: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
               (torchrun, our launcher), Slurm's or MPI's variables
    store      the TCP key-value store on rank 0 that hands out the NCCL unique id
    mpi        MPIGroup: mpi4py over NumPy buffers (the CPU)
    nccl       NCCLGroup: CuPy's NCCL binding on a side stream (the GPU)
    world      init(device) picks and starts the backend; current(); the checks a recipe needs
    watchdog   per-rank heartbeat and collective timeout
    launch     `--gpus N` / `--procs N`: start the ranks, watch them, end the job on the first failure
    reducer    gradients averaged in buckets while the backward runs
    zero       AdamW with its state sharded across ranks (train.zero: 1)
"""
