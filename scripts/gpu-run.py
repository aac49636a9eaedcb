#!/usr/bin/env python3
"""The prepared run on a lent GPU machine (issue #19's figures): the project's release `phi2`
on the machine's Vulkan through wgpu, i.e. the browser's WGSL kernels on a real GPU.

On the build machine (scripts/gpu-prepare.sh does it):
  .gpu/phi2.xz       this tree's `cargo build --release`, xz-compressed
  .gpu/phi2-old.xz   optional: the same from the commit before the kernels to compare
  .gl/*.deb          the Vulkan/EGL loaders the GPU machine's image lacks
Then one run there, carrying .gpu and .gl (about 560 s of limit):
  PYTHONUNBUFFERED=1 DEADLINE=480 python3 scripts/gpu-run.py

Most important first, each step within the deadline:
  1. the same greedy tokens as the CPU backend with every kernel choice (auto, portable,
     subgroups) on the phi-tok fixture, and the same as the old binary's;
  2. `phi2 bench` on a synthetic full-size Phi-2 (512-token prompt, 128 decoded): new kernels
     auto, then old auto, then new portable, new f16; the new auto run with `--matmuls`
     (each matmul shape alone, decode with 2/4/8 rows per workgroup, against the copy).
Everything goes to stdout, $OUT/log.txt and $OUT/summary.json."""
import glob, json, os, subprocess, sys, time

T0 = time.time()
DEADLINE = float(os.environ.get("DEADLINE", "480"))
OUT = os.environ.get("OUT", "/tmp/gpu-out")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.makedirs(OUT, exist_ok=True)
LOG = open(os.path.join(OUT, "log.txt"), "w")
SUMMARY = {"steps": []}


def log(*parts):
    line = f"[{time.time() - T0:6.1f}s] " + " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def record(step):
    SUMMARY["steps"].append(step)
    json.dump(SUMMARY, open(os.path.join(OUT, "summary.json"), "w"), indent=1)


def run(args, timeout):
    """stdout, or None and the error, within the deadline."""
    left = DEADLINE - (time.time() - T0)
    if left < 15:
        log("skipped (deadline):", " ".join(args))
        return None, "skipped: deadline"
    started = time.time()
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=min(timeout, left))
    except subprocess.TimeoutExpired:
        log("timeout:", " ".join(args))
        return None, "timeout"
    log(f"rc={done.returncode} {time.time() - started:.1f}s", " ".join(args))
    if done.stderr.strip():
        LOG.write(done.stderr[-3000:] + "\n")
    if done.returncode != 0:
        return None, (done.stderr or done.stdout).strip()[-600:]
    return done.stdout, None


def shell(command):
    done = subprocess.run(command, shell=True, capture_output=True, text=True)
    return (done.stdout + done.stderr).strip()


# The loaders, NVIDIA's ICD, the binaries.
for deb in glob.glob(os.path.join(ROOT, ".gl", "*.deb")):
    shell(f"dpkg -x {deb} /")
shell("ldconfig")
os.environ["VK_DRIVER_FILES"] = "/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json"
os.environ["__EGL_VENDOR_LIBRARY_FILENAMES"] = "/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json"
libraries = [p for p in ["/usr/local/cuda/lib64", "/usr/local/nvidia/lib64", "/usr/local/nvidia/lib"] if os.path.isdir(p)]
os.environ["LD_LIBRARY_PATH"] = ":".join(libraries + [os.environ.get("LD_LIBRARY_PATH", "")])
binaries = {}
for name in ["phi2", "phi2-old"]:
    packed = os.path.join(ROOT, ".gpu", name + ".xz")
    if os.path.exists(packed):
        shell(f"xz -dc {packed} > /tmp/{name} && chmod +x /tmp/{name}")
        binaries[name] = f"/tmp/{name}"
SUMMARY["gpu"] = shell("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader")
log("gpu:", SUMMARY["gpu"], "| binaries:", sorted(binaries))
if "phi2" not in binaries:
    log("no .gpu/phi2.xz: nothing to run (scripts/gpu-prepare.sh makes it)")
    sys.exit(1)
new = binaries["phi2"]

# The synthetic model is written on the CPU while the GPU checks tokens.
synth = subprocess.Popen([new, "synth", "--preset", "phi-2", "--out", "/tmp/phi2-synth"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

fixture = os.path.join(ROOT, "tests", "fixtures", "phi-tok")
prompt = "Instruct: Write a haiku about GPUs.\nOutput:"


def tokens(exe, flags):
    out, err = run([exe, "generate", "--model", fixture, "--prompt", prompt, "--max-tokens", "24",
                    "--temperature", "0", "--json"] + flags, 120)
    return (json.loads(out)["generated_ids"], None) if out else (None, err)


want, _ = tokens(new, ["--backend", "cpu"])
for kernels in ["auto", "portable", "subgroups"]:
    got, err = tokens(new, ["--backend", "wgpu", "--kernels", kernels])
    step = {"step": f"tokens-{kernels}", "same_as_cpu": want is not None and got == want, "error": err}
    log(json.dumps(step))
    record(step)
if "phi2-old" in binaries:
    got, err = tokens(binaries["phi2-old"], ["--backend", "wgpu"])
    step = {"step": "tokens-old-auto", "same_as_cpu": want is not None and got == want, "error": err}
    log(json.dumps(step))
    record(step)

try:
    _, err = synth.communicate(timeout=max(10, DEADLINE - (time.time() - T0) - 60))
    log(f"synth rc={synth.returncode}", err.strip()[-300:])
except subprocess.TimeoutExpired:
    synth.kill()
    log("synth did not finish")

benches = [("new-auto", new, ["--matmuls"])]
if "phi2-old" in binaries:
    benches.append(("old-auto", binaries["phi2-old"], []))
benches += [("new-portable", new, ["--kernels", "portable"]), ("new-f16", new, ["--f16"])]
keys = ["decodeTokensPerS", "prefillTokensPerS", "prefillDecodeRatio", "bandwidthRatio", "copyGbPerS",
        "decodeEffectiveGbPerS", "launchesPerToken", "timeToFirstTokenS", "prefillGmacPerS", "peakGmacPerS",
        "device"]
for name, exe, flags in benches:
    out, err = run([exe, "bench", "--backend", "wgpu", "--model", "/tmp/phi2-synth", "--json",
                    "--prompt-tokens", "512", "--gen-tokens", "128", "--copy-mb", "512"] + flags, 180)
    step = {"step": "bench-" + name, "error": err}
    if out:
        try:
            step["report"] = json.loads(out)
        except ValueError:
            step["raw"] = out[-2000:]
    report = step.get("report") or {}
    log(name, json.dumps({k: report.get(k) for k in keys}) if report else err)
    for figure in report.get("matmuls") or []:
        log("  matmul", json.dumps(figure))
    record(step)
log("done")
