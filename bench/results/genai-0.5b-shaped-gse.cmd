# onnxruntime-genai 0.18.0 peer on the 0.5b-shaped GSE decoder (fp32, kv_cache shared, 24x896, vocab 151936); text prompt, greedy, eos masked on both sides, 1 thread pinned to core 0 on a quiet machine (load average in the JSON)
python bench/build_bundle.py 0.5b-shaped /tmp/s3/b05
OMP_NUM_THREADS=1 taskset -c 0 /tmp/genai-venv/bin/python -m finers_rt.cli bench --peer genai --peer-stage /tmp/s3/b05/bundle/gse --max-new-tokens 32 --iters 3 --warmup 1 --threads 1 --json bench/results/genai-0.5b-shaped-gse.json
