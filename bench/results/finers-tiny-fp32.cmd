# the shipped finers-tiny source checkpoints re-exported without quantization (parity run)
finers-rt export bundle --gse engines/finers-tiny/source/gse --lpr engines/finers-tiny/source/lpr --sam engines/finers-tiny/source/sam.pth --sam-config engines/finers-tiny/source/sam_config.json --gse-size 644x364 --lpr-size 336x336 --name finers-tiny-fp32 --out /tmp/ft32 --force
finers-rt bench --model /tmp/ft32 --reference --iters 5 --warmup 1 --threads 1 --json bench/results/finers-tiny-fp32.json --plot bench/results/finers-tiny-fp32.png
