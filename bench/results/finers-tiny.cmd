# the shipped default bundle (int8 decoders, kv_cache shared) against its fp32 source checkpoints; 1 thread pinned to one core
OMP_NUM_THREADS=1 taskset -c 0 finers-rt bench --reference --iters 5 --warmup 1 --threads 1 --json bench/results/finers-tiny.json --plot bench/results/finers-tiny.png
