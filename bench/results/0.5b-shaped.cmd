# compute-bound: Qwen2.5-0.5B-shaped text tower (24x896, vocab 151936) for both stages, GSE 448x252, LPR 224x224, 32 new tokens, fp32, 1 thread pinned to one core
python bench/build_bundle.py 0.5b-shaped /tmp/s3/b05
OMP_NUM_THREADS=1 taskset -c 0 finers-rt bench --model /tmp/s3/b05/bundle --reference --queries-per-image 2 --iters 2 --warmup 1 --batch 2 --image-size 1920x1080 --attn auto --max-new-tokens 32 --threads 1 --json bench/results/0.5b-shaped.json --plot bench/results/0.5b-shaped.png
