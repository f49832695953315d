# tiny random Qwen2.5-VL stages (LM 2x64) at the FineRS sizes 1920x1080 / 512x512, small SAM at 1024; 4K images; fp32, 1 thread pinned to one core
python bench/build_bundle.py tiny-finers-sizes /tmp/s3/tinyfull
OMP_NUM_THREADS=1 taskset -c 0 finers-rt bench --model /tmp/s3/tinyfull/bundle --reference --queries-per-image 3 --iters 3 --warmup 1 --batch 2 --image-size 3840x2160 --attn auto --threads 1 --json bench/results/tiny-random-finers-sizes.json --plot bench/results/tiny-random-finers-sizes.png
