# Gaudi image: Habana's PyTorch installer image (its torch is built for HPU and must never be replaced),
# Habana's DeepSpeed fork at the tag of the same Gaudi software release, and this package.
#
#   docker build -t gaudi-pretrain:1.22.0 .                       # or --build-arg GAUDI_VERSION=1.23.0 --build-arg TORCH_VERSION=2.9.0
#   docker run --runtime=habana -e HABANA_VISIBLE_DEVICES=all -e OMPI_MCA_btl_vader_single_copy_mechanism=none \
#       --cap-add=sys_nice --net=host --ipc=host \
#       -v $PWD/run.yaml:/config/run.yaml:ro -v /shards:/data:ro -v $PWD/runs:/runs gaudi-pretrain:1.22.0
#
# The default command trains on one card from /config/run.yaml (whose data.*_shards point under /data and
# train.output_dir under /runs), through launch/run.sh, which exports the config's PT_HPU_LAZY_MODE before
# Python starts (torch loads the Gaudi bridge, which reads it, on import). Eight cards: append
# `launch/mpirun_gaudi.sh -- --config /config/run.yaml`.
ARG GAUDI_VERSION=1.22.0
ARG TORCH_VERSION=2.7.1
# hadolint ignore=DL3007
FROM vault.habana.ai/gaudi-docker/${GAUDI_VERSION}/ubuntu22.04/habanalabs/pytorch-installer-${TORCH_VERSION}:latest
ARG GAUDI_VERSION

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/gaudi_pretrain

# Pin what the image ships (torch family + numpy, as installed) in a constraints file that every pip step
# below uses, so no dependency resolution can replace the HPU build of torch.
RUN python -c "import importlib.metadata as m; \
names = ['torch', 'torchvision', 'torchaudio', 'numpy']; \
print('\n'.join(f'{n}=={m.version(n)}' for n in names if any(d.metadata['Name'].lower() == n for d in m.distributions())))" \
    > /opt/image-constraints.txt \
 && grep -q '^torch==' /opt/image-constraints.txt \
 && cat /opt/image-constraints.txt
ENV PIP_CONSTRAINT=/opt/image-constraints.txt \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Habana's DeepSpeed fork, tag = Gaudi software release (validated there for ZeRO-1/2/3 + bf16).
RUN pip install --no-cache-dir -c /opt/image-constraints.txt \
        "deepspeed @ git+https://github.com/HabanaAI/DeepSpeed.git@${GAUDI_VERSION}"

# Runtime dependencies of this package except torch and deepspeed (keep in sync with pyproject.toml).
# hadolint ignore=DL3059
RUN pip install --no-cache-dir -c /opt/image-constraints.txt \
        "webdataset>=0.2.86" "transformers>=4.55,<6" "tokenizers>=0.20" "safetensors>=0.4" "pillow>=10" \
        "tensorboard>=2.14" "tqdm>=4.66" "pyyaml>=6" "pydantic>=2.6" "matplotlib>=3.7"

COPY pyproject.toml README.md ./
COPY gaudi_pretrain ./gaudi_pretrain
COPY configs ./configs
COPY launch ./launch
# --no-deps: everything it needs is installed above; pip must not resolve torch again.
RUN pip install --no-cache-dir --no-deps -c /opt/image-constraints.txt . \
 && python -c "import torch, deepspeed, gaudi_pretrain; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

CMD ["launch/run.sh", "--", "--config", "/config/run.yaml"]
