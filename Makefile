# fedtiny: every target creates .venv itself when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-8)

.PHONY: install native demo test bench bench-peers deploy-demo firmware firmware-demo firmware-check firmware-profile firmware-opcheck firmware-calibrate ops-tflm op-kinds format docs clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP) native  ## install fedtiny and its dev extras into .venv, build the host kernels

# The simulator's int8 host kernels (same integers as the PyTorch fallback, several times faster).
native:
	@if command -v $${CC:-cc} >/dev/null 2>&1; then $(MAKE) -s -C device/c; \
	else echo "make: no C compiler (cc): the int8 steps run on the PyTorch kernels, same results, slower"; fi

demo: $(STAMP) native  ## run the quickstart scenario
	$(BIN)/fedtiny run scenarios/quickstart.toml

test: $(STAMP) native  ## lint and format check (ruff, a second) and run the test suite
	$(BIN)/ruff check fedtiny clients server tests scripts
	$(BIN)/ruff format --check fedtiny clients server tests scripts
	$(BIN)/python -m pytest -q

op-kinds: $(STAMP)  ## write device/c/fedtiny_op_kinds.h from the op kinds named in fedtiny/int8/ops/base.py (CKind)
	$(BIN)/python -c "from fedtiny.int8.ops.base import c_op_kinds_header as h; print(h(), end='')" \
	    > device/c/fedtiny_op_kinds.h

format: $(STAMP)  ## format the code and sort its imports (ruff; make test checks both)
	$(BIN)/ruff check --select I --fix fedtiny clients server tests scripts
	$(BIN)/ruff format fedtiny clients server tests scripts

bench: $(STAMP) native  ## benchmarks (ratios against an in-process baseline)
	$(BIN)/fedtiny bench sim --json

bench-peers: $(STAMP)  ## fedtiny, Flower's plain simulation and pfl-research on one FedAvg workload (pfl's env: .bench-envs/pfl, made on first use)
	$(BIN)/fedtiny bench peers --json

deploy-demo: $(STAMP) native  ## SuperLink + 2 SuperNodes (one bridged to a device emulator), 2 rounds, then stop; TLS=1: with TLS and SuperNode auth
	TLS=$(TLS) ./scripts/deploy_demo.sh

# The Cortex-M firmware (device/firmware) for QEMU's mps2-an386 (BOARD=an500: Cortex-M7; netduinoplus2:
# STM32F405), training partition 1 of FIRMWARE_SCENARIO. The demo federates two of the scenario's clients
# for two rounds (FIRMWARE_SET, applied to the firmware and the federation alike). Needs Debian's
# gcc-arm-none-eabi and libnewlib-arm-none-eabi.
FIRMWARE_SCENARIO ?= scenarios/firmware-demo.toml
FIRMWARE_SET ?= run.clients=2 run.rounds=2
BOARD ?= an386
KERNELS ?=
PROFILE ?= 0
CHECK ?= 0
# a measurement build (PROFILE=1) or the portable kernels (KERNELS=portable) get their own folder
FIRMWARE_OUT = build/firmware/$(BOARD)$(if $(filter portable,$(KERNELS)),-portable)$(if $(filter 1,$(PROFILE)),-profile)$(if $(filter 1,$(CHECK)),-check)
firmware: $(STAMP) native  ## cross-compile the firmware into build/firmware/$(BOARD)/firmware.elf
	@command -v arm-none-eabi-gcc >/dev/null 2>&1 || { echo "make firmware: arm-none-eabi-gcc not found: install the Debian package gcc-arm-none-eabi (apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi)" >&2; exit 2; }
	@test -f "$$(arm-none-eabi-gcc -mthumb -mcpu=cortex-m4 -mfloat-abi=hard -mfpu=fpv4-sp-d16 -print-file-name=libc_nano.a)" || { echo "make firmware: newlib for arm-none-eabi not found: install the Debian package libnewlib-arm-none-eabi" >&2; exit 2; }
	$(BIN)/fedtiny device firmware $(FIRMWARE_SCENARIO) --partition 1 --out build/firmware/gen --json \
	    $(foreach kv,$(FIRMWARE_SET),--set $(kv))
	$(MAKE) -s -C device/firmware BOARD=$(BOARD) $(if $(KERNELS),KERNELS=$(KERNELS)) PROFILE=$(PROFILE) CHECK=$(CHECK) GEN=$(CURDIR)/build/firmware/gen \
	    OUT=$(CURDIR)/$(FIRMWARE_OUT)

firmware-demo: firmware  ## QEMU running the firmware + SuperLink + 2 SuperNodes (one bridged to QEMU's UART), 2 rounds, JSON summary
	FIRMWARE=1 BOARD=$(BOARD) FIRMWARE_SCENARIO=$(FIRMWARE_SCENARIO) FIRMWARE_SET="$(FIRMWARE_SET)" \
	    ./scripts/deploy_demo.sh

firmware-check: firmware  ## the firmware in QEMU for 2 rounds against the simulated client: UPDATE bytes identical, JSON line
	$(BIN)/python scripts/firmware_check.py $(FIRMWARE_OUT)/firmware.elf $(FIRMWARE_SCENARIO) --board $(BOARD) \
	    $(foreach kv,$(FIRMWARE_SET),--set $(kv))

firmware-profile:  ## a measurement build in QEMU for one round: instructions per op kind and part, JSON line (PROFILE_OUT=file)
	$(MAKE) -s firmware PROFILE=1
	$(BIN)/python scripts/firmware_profile.py $(FIRMWARE_OUT)-profile/firmware.elf build/firmware/gen $(FIRMWARE_SCENARIO) \
	    --board $(BOARD) $(foreach kv,$(FIRMWARE_SET),--set $(kv)) $(if $(PROFILE_OUT),--out $(PROFILE_OUT))

firmware-opcheck:  ## the firmware's check build in QEMU against the host's C step, op by op (every tensor's hash), one round
	$(MAKE) -s firmware CHECK=1
	$(MAKE) -s -C device/c libfedtiny_step_check.so
	$(BIN)/python scripts/firmware_opcheck.py $(FIRMWARE_OUT)-check/firmware.elf $(FIRMWARE_SCENARIO) --board $(BOARD) \
	    $(foreach kv,$(FIRMWARE_SET),--set $(kv))

# The per-kind kernel costs the device-time model charges (fedtiny/kernel_costs.py): tiny-ir trained in full
# (every op kind and part) on the Cortex-M4 (an386) and M7 (an500), DSP and portable kernels.
CALIBRATE_SET ?= run.clients=2 run.rounds=2 train.scheme=full
firmware-calibrate:  ## measure the kernel costs on tiny-ir in QEMU (M4, M7; dsp, portable) and write fedtiny/kernel_costs.py
	@mkdir -p build/calibrate
	for b in an386 an500; do for k in dsp portable; do \
	    $(MAKE) -s firmware-profile BOARD=$$b KERNELS=$$k FIRMWARE_SCENARIO=scenarios/firmware-demo.toml \
	        FIRMWARE_SET="$(CALIBRATE_SET)" PROFILE_OUT=build/calibrate/$$b-$$k.json > /dev/null || exit 1; done; done
	$(BIN)/python scripts/firmware_calibrate.py build/calibrate/an386-dsp.json build/calibrate/an386-portable.json \
	    build/calibrate/an500-dsp.json build/calibrate/an500-portable.json \
	    | $(BIN)/ruff format --stdin-filename fedtiny/kernel_costs.py - > fedtiny/kernel_costs.py.new
	mv fedtiny/kernel_costs.py.new fedtiny/kernel_costs.py

ops-tflm: $(STAMP) native  ## every op kind's output tensors against TFLite Micro on 32 random inputs (markdown table)
	$(BIN)/python scripts/ops_vs_tflm.py

# The scenario reference is generated from the schema (fedtiny/scenario.py), then the docs' links are checked.
docs: $(STAMP)  ## regenerate docs/guide/scenario-reference.md and check every relative link in README.md and docs/
	$(BIN)/python -m fedtiny.tools.reference > docs/guide/scenario-reference.md
	$(BIN)/python -m pytest -q tests/test_docs.py

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
	$(MAKE) -s -C device/c clean
