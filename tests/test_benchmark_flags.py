"""The benchmarks' flags: a bad value is refused while parsing, by its flag's name and with exit
status 2, before any work (no benchmark runs here: only each module's parse); the defaults and the
invocations documented in README.md, benchmarks/RESULTS.md and benchmarks/gpu_suite.sh still parse.
benchmarks.real_data's refusals are in tests/test_real_data.py; the row, mode and seed lists already
refused by main in test_cpu_speed, test_mean_prior and test_nfe are not repeated here."""
import importlib
import shlex

import pytest

from benchmarks import nfe
from ddpm_fast.schedulers import DEFAULT_METHOD, DEFAULT_STEPS

# the flags a module requires (parse alone never opens the run)
REQUIRED = {m: ["--ckpt", "runs/x"] for m in ("bpd_estimate", "colour_stats", "grey_tint", "guidance", "mean_prior",
                                              "nfe")} | {"shape_time": ["--shape", "base="]}

BAD = [  # (module, the bad arguments, the flag the refusal names)
    ("bpd_estimate", "--images 0", "--images"),
    ("bpd_estimate", "--k 0,100", "--k"),
    ("bpd_estimate", "--k 5,x", "--k"),
    ("bpd_estimate", "--draws 1", "--draws"),
    ("bpd_estimate", "--seed -1", "--seed"),
    ("bpd_estimate", "--ckpt ,", "--ckpt"),
    ("colour_cast", "--steps 0", "--steps"),
    ("colour_cast", "--batch-size -1", "--batch-size"),
    ("colour_cast", "--lr nan", "--lr"),
    ("colour_cast", "--lr 0", "--lr"),
    ("colour_cast", "--samples 0", "--samples"),
    ("colour_cast", "--seed -1", "--seed"),
    ("colour_cast", "--changes adamw,sgd", "--changes"),
    ("colour_stats", "--samples 1", "--samples"),
    ("colour_stats", "--seed 4294967296", "--seed"),
    ("cpu_speed", "--steps 0", "--steps"),
    ("cpu_speed", "--rounds -1", "--rounds"),
    ("cpu_speed", "--batch-size 0", "--batch-size"),
    ("cpu_speed", "--warmup -1", "--warmup"),
    ("cpu_speed", "--sample-n 0", "--sample-n"),
    ("cpu_speed", "--image-size 0", "--image-size"),
    ("cpu_speed", "--presets tiny,huge", "--presets"),
    ("cpu_speed", "--sample-presets cifar", "--sample-presets"),
    ("data_loading", "--n 0", "--n"),
    ("data_loading", "--image-size -8", "--image-size"),
    ("data_loading", "--batch-size 0", "--batch-size"),
    ("data_loading", "--workers -1", "--workers"),
    ("epoch", "--image-size 0", "--image-size"),
    ("epoch", "--batch-size 0", "--batch-size"),
    ("epoch", "--epoch-images 0", "--epoch-images"),
    ("epoch", "--steps 0", "--steps"),
    ("epoch", "--warmup -1", "--warmup"),
    ("epoch", "--workers -2", "--workers"),
    ("epoch", "--epoch-images 100 --batch-size 128", "--epoch-images"),  # no whole batch: no timed step
    ("fidelity", "--image-size 0", "--image-size"),
    ("fidelity", "--batch-size 0", "--batch-size"),
    ("fidelity", "--steps 0", "--steps"),
    ("fidelity", "--lr -1e-3", "--lr"),
    ("fidelity", "--lr inf", "--lr"),
    ("fidelity", "--warmup -1", "--warmup"),
    ("fidelity", "--timesteps 0", "--timesteps"),
    ("fidelity", "--seeds 0", "--seeds"),
    ("fidelity", "--seeds 0,x", "--seeds"),
    ("fidelity", "--seeds -1,1", "--seeds"),
    ("fidelity", "--test-images 0", "--test-images"),
    ("fidelity", "--mse-draws 0", "--mse-draws"),
    ("fidelity", "--kid-samples 1", "--kid-samples"),
    ("fidelity", "--kid-samples -1", "--kid-samples"),
    ("fidelity", "--save-samples -1", "--save-samples"),
    ("fidelity", "--runs fast:x", "--runs"),
    ("grey_tint", "--samples 0", "--samples"),
    ("grey_tint", "--images 0", "--images"),
    ("grey_tint", "--seed -1", "--seed"),
    ("guidance", "--n 1", "--n"),
    ("guidance", "--steps 0", "--steps"),
    ("guidance", "--classifier-epochs 0", "--classifier-epochs"),
    ("guidance", "--seed 1.5", "--seed"),
    ("guidance", "--scales 1,x", "--scales"),
    ("guidance", "--scales 1,nan", "--scales"),
    ("guidance", "--scales ,", "--scales"),
    ("guidance", "--method ddpn", "--method"),
    ("mean_prior", "--samples 1", "--samples"),
    ("mean_prior", "--seed -1", "--seed"),
    ("nfe", "--images 1", "--images"),
    ("nfe", "--ref-images 0", "--ref-images"),
    ("nfe", "--batch-size 0", "--batch-size"),
    ("nfe", "--nfe 0,5", "--nfe"),
    ("nfe", "--nfe 5,x", "--nfe"),
    ("nfe", "--nfe ''", "--nfe"),
    ("nfe", "--solvers ddim,unipc:karras:x", "--solvers"),
    ("profile_step", "--image-size 0", "--image-size"),
    ("profile_step", "--batch-size 0", "--batch-size"),
    ("profile_step", "--sample-n 0", "--sample-n"),
    ("profile_step", "--warmup -1", "--warmup"),
    ("profile_step", "--steps 0", "--steps"),
    ("profile_step", "--top 0", "--top"),
    ("eval_chunk", "--presets tiny", "--presets"),  # no =N
    ("eval_chunk", "--presets huge=8", "--presets"),
    ("eval_chunk", "--presets tiny=0", "--presets"),
    ("eval_chunk", "--chunks 8,0", "--chunks"),
    ("eval_chunk", "--elements 0", "--elements"),
    ("eval_chunk", "--rounds 0", "--rounds"),
    ("eval_chunk", "--sample-preset tiny", "--sample-preset"),
    ("eval_chunk", "--sampler-rows capped,wole", "--sampler-rows"),
    ("eval_memory", "--presets tiny,huge", "--presets"),
    ("eval_memory", "--elements 0", "--elements"),
    ("eval_memory", "--batch 0", "--batch"),
    ("heap", "--steps 0", "--steps"),
    ("heap", "--pairs 0", "--pairs"),
    ("heap", "--warmup -1", "--warmup"),
    ("heap", "--batch-size 0", "--batch-size"),
    ("heap", "--image-size 0", "--image-size"),
    ("heap", "--preset huge", "--preset"),
    ("profile_step", "--paths reference,fats", "--paths"),
    ("profile_step", "--workloads train,infer", "--workloads"),
    ("sample", "--image-size 0", "--image-size"),
    ("sample", "--n 0", "--n"),
    ("sample", "--timesteps 0", "--timesteps"),
    ("sample", "--ddpm-steps 0", "--ddpm-steps"),
    ("sample", "--ddpm-steps 2000", "--ddpm-steps"),  # more than the 1000 timesteps
    ("sample", "--few-step ddim", "--few-step"),
    ("sample", "--few-step ddim:0", "--few-step"),
    ("sample", "--few-step dim:10", "--few-step"),
    ("sample", "--paths reference,fsat", "--paths"),
    ("shape_time", "--rounds 0", "--rounds"),
    ("shape_time", "--steps 0", "--steps"),
    ("shape_time", "--warmup -1", "--warmup"),
    ("shape_time", "--shape mult4", "--shape"),  # no =
    ("shape_time", "--shape base=", "--shape"),  # a name twice (REQUIRED gives base= too)
    ("shape_time", "--shape 'x=--num-res-blocks 0'", "--shape"),  # the trainer's refusal, under --shape
    ("shape_time", "--shape 'x=--bogus 1'", "--shape"),
    ("shape_time", "--shape 'x=--attn-res \"8'", "--shape"),  # an unclosed quote
    ("sm90", "--jobs 0", "--jobs"),
]


def parse(module: str, args: str):
    return importlib.import_module(f"benchmarks.{module}").parse(REQUIRED.get(module, []) + shlex.split(args))


@pytest.mark.parametrize("module, args, flag", BAD, ids=[f"{m}: {a}" for m, a, _ in BAD])
def test_a_bad_value_is_refused_by_its_flag(module, args, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse(module, args)
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the usage line above names every flag
    assert e.value.code == 2 and "error: " in error and flag in error.split("error: ", 1)[1], error


@pytest.mark.parametrize("module", sorted({m for m, _, _ in BAD}))
def test_the_defaults_parse(module):
    parse(module, "")


def test_parsed_defaults_are_the_ones_used():
    assert parse("fidelity", "").seeds == (0, 1)
    assert parse("guidance", "").scales == (1, 1.5, 2, 3, 5)
    assert parse("nfe", "").nfe == nfe.NFE_GRID and parse("nfe", "--seeds 2,0,2").seeds == [2, 0]
    assert parse("sample", "").few_step == (DEFAULT_METHOD, DEFAULT_STEPS)
    assert parse("sample", "").paths == parse("profile_step", "").paths == ("reference", "fast")
    assert parse("profile_step", "").workloads == ("train", "sample")
    assert parse("epoch", "--epoch-images 1000 --batch-size 128").steps == 7  # one epoch of whole batches
    assert parse("cpu_speed", "").image_size is None and parse("mean_prior", "").seed is None  # the preset's, the run's
    assert parse("heap", "").fast is None and parse("heap", "--no-fast").fast is False  # the CPU's default, as train's


DOCUMENTED = [  # as README.md, benchmarks/RESULTS.md, gpu_suite.sh and .ci/run call them
    ("bpd_estimate", "--ckpt runs/default,runs/g4k_min_snr,runs/emoji5k"),
    ("colour_cast", "--changes ''"),
    ("colour_cast", "--no-diffusers --changes no_ema,adamw,cosine_lr_warmup_500"),
    ("cpu_speed", "--presets tiny --sample-presets tiny --steps 30 --rounds 5 --warmup 3 --sample-n 64"),
    ("cpu_speed", "--presets cifar32 --train-rows reference,bf16,fast_eager,fast,diffusers --sample-rows '' "
                  "--steps 4 --rounds 3 --warmup 2"),
    ("cpu_speed", "--presets tiny --train-rows '' --sample-presets tiny "
                  "--sample-rows reference,fast_eager,library,diffusers --rounds 5 --warmup 3 --sample-n 64"),
    ("cpu_speed", "--presets tiny --train-rows '' --sample-presets tiny "
                  "--sample-rows reference,system_heap,diffusers,reference,system_heap --sample-n 256 --rounds 3"),
    ("cpu_speed", "--presets cifar32 --train-rows reference,system_heap --sample-rows '' --steps 4 --rounds 3"),
    ("cpu_speed", "--presets tiny --image-size 32 --batch-size 16 --train-rows reference,fp32_cl,reference,fp32_cl "
                  "--sample-presets tiny --sample-rows reference,fp32_cl --steps 60 --rounds 5 --warmup 3"),
    ("epoch", "--quick --paths reference,fast_eager,fast"),
    ("eval_chunk", ""),
    ("eval_memory", ""),
    ("eval_chunk", "--presets cifar32=256 --chunks 256,64 --elements 8388608 --rounds 3 --sampler-rows ''"),
    ("heap", "--preset tiny --image-size 64 --batch-size 32 --steps 6 --pairs 5"),
    ("heap", "--preset tiny --batch-size 16 --steps 20 --pairs 4"),
    ("heap", "--preset anime64 --batch-size 16 --steps 3 --pairs 4"),
    ("heap", "--preset cifar32 --batch-size 32 --steps 4 --pairs 4"),
    ("fidelity", "--steps 300 --kid-samples 128 --test-images 206 --runs reference:0,fast:0,reference:1,fast:1"),
    ("fidelity", "--preset anime64 --image-size 64 --batch-size 128 --steps 400 --lr 2e-4 --warmup 100 "
                 "--compile none --save-samples 500 --runs reference:0,fast:0,fast:1"),
    ("fidelity", "--combine fidelity-run-a.json fidelity-run-b.json --kid-samples 500"),
    ("mean_prior", "--modes none,prior"),
    ("nfe", "--images 128 --batch-size 128 --solvers ddpm,ddim:trailing,dpmpp_2m,dpmpp_2m:karras,dpmpp_3m,unipc "
            "--nfe 5,10,15,20,25,50,100"),
    ("nfe", "--resume --solvers unipc::3,euler:karras --nfe 10,20,50"),
    ("nfe", "--images 128 --batch-size 128 --seeds 0,1,2 --no-yardstick --fast "
            "--solvers dpmpp_2m_sde:karras,dpmpp_2m_sde:karras::0.03 --nfe 20"),
    ("profile_step", "--preset tiny --image-size 32 --batch-size 32 --sample-n 64 --workloads train,sample "
                     "--paths fast --compile none --steps 5"),
    ("profile_step", "--steps 3"),
    ("sample", "--quick"),
    ("shape_time", "--shape 'mult4=--ch-mult 1,2,2,2' --shape 'res2=--num-res-blocks 2' "
                   "--shape 'attn16=--attn-res 8,16'"),
    ("sm90", "--require-hgmma"),
]


@pytest.mark.parametrize("module, args", DOCUMENTED, ids=[f"{m}: {a}" for m, a in DOCUMENTED])
def test_documented_invocations_parse(module, args):
    parse(module, args)
