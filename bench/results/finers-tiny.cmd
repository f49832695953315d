finers-rt bench --reference --iters 5 --warmup 1 --threads 1 --json bench/results/finers-tiny.json --plot bench/results/finers-tiny.png
