//! Analyses of this machine's own root (Debian 12 with python3.11 and
//! busybox-static), and of small rootfs trees built from its binaries.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use super::*;

const SCRIPT_IMPORTS: &str = "\
import json, re, collections, datetime
import pathlib
import hashlib, base64
import argparse, subprocess, logging
import urllib.parse
from decimal import Decimal

# import tkinter  (a comment, not an import)
HELP = 'import idlelib'

def main():
    import shlex  # the script calls main()

if __name__ == '__main__':
    main()
";

fn config(argv: &[&str], cwd: &str, env: &[&str]) -> ImageConfigInfo {
    ImageConfigInfo {
        entrypoint: argv.iter().map(|s| (*s).to_owned()).collect(),
        cmd: Vec::new(),
        working_dir: cwd.to_owned(),
        env: env.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn host() -> DirView {
    DirView::new("/").unwrap()
}

fn canonical(path: &str) -> String {
    fs::canonicalize(path)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn assert_has(list: &PrefetchList, path: &str) {
    assert!(
        list.contains(path),
        "{path} missing from:\n{}",
        list.paths()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn assert_has_name(list: &PrefetchList, name: &str) {
    assert!(
        list.paths().any(|p| p.file_name() == name),
        "no file named {name} in:\n{}",
        list.paths()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn write_script(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

/// The first entry that the command itself (not the runtime) reads.
fn first_of_command(list: &PrefetchList) -> &PrefetchEntry {
    list.entries
        .iter()
        .find(|entry| entry.reason != Reason::RuntimeSetup)
        .unwrap()
}

fn assert_python_start(list: &PrefetchList) {
    assert_has(list, "/usr/bin/python3.11");
    assert_has(list, &canonical("/lib64/ld-linux-x86-64.so.2"));
    for lib in ["libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1"] {
        assert_has_name(list, lib);
    }
    let stdlib = "/usr/lib/python3.11";
    for module in [
        "json/__init__.py",
        "json/decoder.py",
        "json/scanner.py",
        "json/__pycache__/__init__.cpython-311.pyc",
        "re/__init__.py",
        "re/_compiler.py",
        "collections/__init__.py",
        "datetime.py",
        "pathlib.py",
        "hashlib.py",
        "base64.py",
        "argparse.py",
        "subprocess.py",
        "logging/__init__.py",
        "urllib/__init__.py",
        "urllib/parse.py",
        "decimal.py",
        "encodings/__init__.py",
        "encodings/aliases.py",
        "encodings/utf_8.py",
    ] {
        assert_has(list, &format!("{stdlib}/{module}"));
    }
    // C extensions and what they link.
    assert_has(
        list,
        &format!("{stdlib}/lib-dynload/_hashlib.cpython-311-x86_64-linux-gnu.so"),
    );
    assert_has(
        list,
        &format!("{stdlib}/lib-dynload/_decimal.cpython-311-x86_64-linux-gnu.so"),
    );
    assert_has_name(list, "libcrypto.so.3");
    assert_has(list, "/etc/ld.so.cache");
    for entry in &list.entries {
        let path = entry.path.as_str();
        assert!(!path.starts_with("/usr/share/doc"), "unrelated file {path}");
        for unrelated in [
            "tkinter", "idlelib", "unittest", "lib2to3", "/test/", "asyncio", "email", "doctest",
        ] {
            assert!(
                !path.contains(unrelated),
                "unrelated module {path} ({})",
                entry.reason
            );
        }
    }
    assert!(list.entries.len() < 400, "{} entries", list.entries.len());
}

#[test]
fn python_script_on_the_host_root() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "script.py", SCRIPT_IMPORTS);
    let list =
        analyze_entrypoint(&host(), &config(&["/usr/bin/python3", &script], "/", &[])).unwrap();
    assert_has(&list, "/usr/bin/python3");
    assert_eq!(list.entries[0].path.as_str(), "/etc/passwd");
    assert_eq!(list.entries[0].reason, Reason::RuntimeSetup);
    assert_eq!(first_of_command(&list).path.as_str(), "/usr/bin/python3");
    assert_eq!(first_of_command(&list).kind, PrefetchKind::Symlink);
    assert_has(&list, "/usr/lib/python3.11/shlex.py");
    assert_has(&list, &canonical(&script));
    assert_python_start(&list);
    let index = |path: &str| list.paths().position(|p| p.as_str() == path).unwrap();
    assert!(index("/usr/bin/python3.11") < index(&canonical(&script)));
    assert!(index(&canonical(&script)) < index("/usr/lib/python3.11/json/__init__.py"));
}

#[test]
fn env_shebang_finds_python_in_path() {
    let dir = tempfile::tempdir().unwrap();
    let tool = write_script(
        dir.path(),
        "tool",
        &format!("#!/usr/bin/env python3\n{SCRIPT_IMPORTS}"),
    );
    let list = analyze_entrypoint(
        &host(),
        &config(
            &[&tool, "--verbose"],
            "/",
            &["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        ),
    )
    .unwrap();
    assert_eq!(first_of_command(&list).path.as_str(), canonical(&tool));
    assert_has(&list, "/usr/bin/env");
    assert!(matches!(
        list.entries
            .iter()
            .find(|e| e.path.as_str() == "/usr/bin/env")
            .unwrap()
            .reason,
        Reason::ScriptInterpreter { .. }
    ));
    assert_python_start(&list);
}

#[test]
fn sh_c_follows_cd_and_exec() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "script.py", SCRIPT_IMPORTS);
    let dir_str = canonical(dir.path().to_str().unwrap());
    let line = format!("cd {dir_str} && exec python3 -u script.py \"$@\" > /dev/null 2>&1");
    let list = analyze_entrypoint(
        &host(),
        &config(
            &["/bin/sh", "-c", &line, "sh", "x"],
            "/",
            &["PATH=/usr/bin:/bin"],
        ),
    )
    .unwrap();
    assert_has(&list, "/bin");
    assert_has(&list, &canonical("/bin/sh"));
    assert_has(&list, &format!("{dir_str}/script.py"));
    assert_python_start(&list);
}

#[test]
fn missing_entrypoint_gives_an_empty_list_and_a_warning() {
    let list = analyze_entrypoint(&host(), &config(&["/no/such/binary", "arg"], "/", &[])).unwrap();
    assert!(list.entries.is_empty(), "{:?}", list.entries);
    assert!(list.warnings.iter().any(
        |w| matches!(w, Warning::CommandNotFound { command } if command == "/no/such/binary")
    ));
    let in_path =
        analyze_entrypoint(&host(), &config(&["no-such-command-here"], "/", &[])).unwrap();
    assert!(in_path.entries.is_empty());
    assert_eq!(in_path.warnings.len(), 1);
    let empty = analyze_entrypoint(&host(), &ImageConfigInfo::default()).unwrap();
    assert!(empty.entries.is_empty());
    assert_eq!(empty.warnings, vec![Warning::EmptyCommand]);
}

/// A tiny busybox image: `/bin/sh -> busybox`, a shell entrypoint script, and
/// symlinks that point outside the root on the host.
fn busybox_root(root: &Path) {
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("app")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::copy("/usr/bin/busybox", root.join("usr/bin/busybox")).unwrap();
    symlink("usr/bin", root.join("bin")).unwrap();
    symlink("busybox", root.join("usr/bin/sh")).unwrap();
    write_script(
        &root.join("app"),
        "run.sh",
        "#!/bin/sh\nexec /app/server --config /etc/app.conf\n",
    );
    fs::write(root.join("etc/app.conf"), "port=80\n").unwrap();
    // On the host these lead to the real /etc and /usr; inside the image they do not exist.
    symlink("/etc/passwd", root.join("app/server")).unwrap();
    symlink(
        "../../../../../../../usr/bin/python3.11",
        root.join("app/python"),
    )
    .unwrap();
    symlink("loop-b", root.join("app/loop-a")).unwrap();
    symlink("/app/loop-a", root.join("app/loop-b")).unwrap();
}

#[test]
fn entrypoint_script_exec_runs_the_cmd() {
    let root = tempfile::tempdir().unwrap();
    busybox_root(root.path());
    write_script(
        &root.path().join("app"),
        "docker-entrypoint.sh",
        "#!/bin/sh\nset -e\nif [ \"$1\" = 'serve' ]; then\n  exec /bin/busybox httpd -f -c /etc/app.conf\nfi\nexec \"$@\"\n",
    );
    let view = DirView::new(root.path()).unwrap();
    let mut cfg = config(&["/app/docker-entrypoint.sh"], "/", &[]);
    cfg.cmd = vec!["/app/run.sh".to_owned()];
    let list = analyze_entrypoint(&view, &cfg).unwrap();
    let paths: Vec<&str> = list.paths().map(|p| p.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "/app/docker-entrypoint.sh",
            "/bin",
            "/usr/bin/sh",
            "/usr/bin/busybox",
            "/etc/app.conf",
            "/app/run.sh",
        ]
    );
}

#[test]
fn busybox_image_in_a_temp_root_never_escapes() {
    let root = tempfile::tempdir().unwrap();
    busybox_root(root.path());
    let view = DirView::new(root.path()).unwrap();
    let list = analyze_entrypoint(&view, &config(&["/app/run.sh"], "/app", &[])).unwrap();
    let paths: Vec<&str> = list.paths().map(|p| p.as_str()).collect();
    assert_eq!(
        paths,
        vec!["/app/run.sh", "/bin", "/usr/bin/sh", "/usr/bin/busybox"]
    );
    // busybox is static: no loader, no libraries, nothing unparsable.
    assert!(
        !list
            .warnings
            .iter()
            .any(|w| matches!(w, Warning::BadElf { .. }))
    );

    let escaping = analyze_entrypoint(
        &view,
        &config(
            &["/bin/sh", "-c", "/app/server; /app/python x.py; ./loop-a"],
            "/app",
            &[],
        ),
    )
    .unwrap();
    for path in escaping.paths() {
        assert!(
            !path.as_str().contains("passwd") && !path.as_str().contains("python3.11"),
            "{path}"
        );
    }
    assert!(escaping.warnings.iter().any(|w| matches!(
        w,
        Warning::Unresolved {
            failure: ResolveFailure::TooManySymlinks,
            ..
        }
    )));
    assert_eq!(
        escaping
            .warnings
            .iter()
            .filter(|w| matches!(w, Warning::CommandNotFound { .. }))
            .count(),
        3
    );
}

#[test]
fn shell_script_file_arguments_and_wrappers() {
    let root = tempfile::tempdir().unwrap();
    busybox_root(root.path());
    fs::remove_file(root.path().join("app/server")).unwrap();
    symlink("../usr/bin/busybox", root.path().join("app/server")).unwrap();
    let view = DirView::new(root.path()).unwrap();
    // `env` is a busybox applet here: it runs `sh /app/run.sh`.
    symlink("busybox", root.path().join("usr/bin/env")).unwrap();
    let list = analyze_entrypoint(
        &view,
        &config(&["env", "A=1", "sh", "run.sh"], "/app", &["PATH=/bin"]),
    )
    .unwrap();
    assert_has(&list, "/app/run.sh");
    assert_has(&list, "/usr/bin/busybox");
    // run.sh ends in `exec /app/server --config /etc/app.conf`.
    assert_has(&list, "/app/server");
    assert_has(&list, "/etc/app.conf");
    assert!(list.warnings.is_empty(), "{:?}", list.warnings);
    // Files named on a command line are read by the program.
    let list = analyze_entrypoint(
        &view,
        &config(&["/app/server", "--config=/etc/app.conf", "-v"], "/", &[]),
    )
    .unwrap();
    assert_has(&list, "/etc/app.conf");
}

/// The busybox image again, as layers: the analysis sees the same files.
#[test]
fn layer_stack_view_runs_the_same_analysis() {
    let busybox = fs::read("/usr/bin/busybox").unwrap();
    let script = b"#!/bin/sh\nexec busybox true\n".to_vec();
    let file = |data: &[u8], mode| LayerEntry {
        kind: LayerEntryKind::File {
            size: data.len() as u64,
        },
        mode,
    };
    let link = |target: &str| LayerEntry {
        kind: LayerEntryKind::Symlink {
            target: target.to_owned(),
        },
        mode: 0o777,
    };
    let base: LayerEntries = [
        (ImagePath::new("usr/bin/busybox"), file(&busybox, 0o755)),
        (ImagePath::new("bin"), link("usr/bin")),
        (ImagePath::new("usr/bin/sh"), link("busybox")),
        (ImagePath::new("app/start"), file(b"old", 0o755)),
    ]
    .into_iter()
    .collect();
    let app: LayerEntries = [
        (ImagePath::new("app/.wh..wh..opq"), file(b"", 0o644)),
        (ImagePath::new("app/run"), file(&script, 0o755)),
    ]
    .into_iter()
    .collect();
    let mut contents: HashMap<(usize, String), Vec<u8>> = HashMap::new();
    contents.insert((0, "/usr/bin/busybox".to_owned()), busybox);
    contents.insert((1, "/app/run".to_owned()), script);
    let view = LayerStackView::new(
        vec![base, app],
        move |layer: LayerPosition, path: &ImagePath, offset: u64, max: usize| {
            let data = contents
                .get(&(layer.0, path.as_str().to_owned()))
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            let start = (offset as usize).min(data.len());
            let end = start.saturating_add(max).min(data.len());
            Ok(data[start..end].to_vec())
        },
    );
    let list = analyze_entrypoint(&view, &config(&["/app/run"], "/", &["PATH=/bin"])).unwrap();
    let paths: Vec<&str> = list.paths().map(|p| p.as_str()).collect();
    assert_eq!(
        paths,
        vec!["/app/run", "/bin", "/usr/bin/sh", "/usr/bin/busybox"]
    );
    let groups = view.split_by_layer(list.paths());
    let names = |group: &Vec<ImagePath>| group.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    assert_eq!(
        names(&groups[0]),
        vec!["/bin", "/usr/bin/sh", "/usr/bin/busybox"]
    );
    assert_eq!(names(&groups[1]), vec!["/app/run"]);
    let hidden = analyze_entrypoint(&view, &config(&["/app/start"], "/", &[])).unwrap();
    assert!(
        hidden.entries.is_empty(),
        "the opaque directory hides /app/start"
    );
}

fn cc(args: &[&str]) {
    let status = std::process::Command::new("cc")
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "cc {args:?}");
}

/// A program built here with `RUNPATH=$ORIGIN/../lib`, one library found through
/// `/etc/ld.so.conf`'s `include`, and glibc copied from the host.
#[test]
fn elf_runpath_origin_and_ld_so_conf_include() {
    let root = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let r = root.path();
    for dir in [
        "opt/app/bin",
        "opt/app/lib",
        "opt/other/lib",
        "etc/ld.so.conf.d",
        "lib/x86_64-linux-gnu",
        "lib64",
    ] {
        fs::create_dir_all(r.join(dir)).unwrap();
    }
    let s = |name: &str| src.path().join(name).to_string_lossy().into_owned();
    let p = |name: &str| r.join(name).to_string_lossy().into_owned();
    fs::write(s("foo.c"), "int foo(void) { return 1; }\n").unwrap();
    fs::write(s("bar.c"), "int bar(void) { return 2; }\n").unwrap();
    fs::write(
        s("main.c"),
        "int foo(void); int bar(void); int main(void) { return foo() + bar(); }\n",
    )
    .unwrap();
    cc(&[
        "-shared",
        "-fPIC",
        "-Wl,-soname,libfoo.so.1",
        "-o",
        &p("opt/app/lib/libfoo.so.1"),
        &s("foo.c"),
    ]);
    symlink("libfoo.so.1", r.join("opt/app/lib/libfoo.so")).unwrap();
    cc(&[
        "-shared",
        "-fPIC",
        "-o",
        &p("opt/other/lib/libbar.so"),
        &s("bar.c"),
    ]);
    cc(&[
        "-o",
        &p("opt/app/bin/prog"),
        &s("main.c"),
        &format!("-L{}", p("opt/app/lib")),
        &format!("-L{}", p("opt/other/lib")),
        "-lfoo",
        "-lbar",
        "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib",
    ]);
    fs::copy(
        canonical("/lib64/ld-linux-x86-64.so.2"),
        r.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
    )
    .unwrap();
    symlink(
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        r.join("lib64/ld-linux-x86-64.so.2"),
    )
    .unwrap();
    fs::copy(
        canonical("/lib/x86_64-linux-gnu/libc.so.6"),
        r.join("lib/x86_64-linux-gnu/libc.so.6"),
    )
    .unwrap();
    fs::write(
        r.join("etc/ld.so.conf"),
        "include /etc/ld.so.conf.d/*.conf\n",
    )
    .unwrap();
    fs::write(
        r.join("etc/ld.so.conf.d/other.conf"),
        "# extra\n/opt/other/lib\n",
    )
    .unwrap();
    fs::write(r.join("etc/ld.so.conf.d/ignored.txt"), "/nowhere\n").unwrap();

    let view = DirView::new(r).unwrap();
    let list = analyze_entrypoint(&view, &config(&["prog"], "/", &["PATH=/opt/app/bin"])).unwrap();
    let paths: Vec<&str> = list.paths().map(|p| p.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "/opt/app/bin/prog",
            "/lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "/opt/app/lib/libfoo.so.1",
            "/opt/other/lib/libbar.so",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ]
    );
    assert!(list.warnings.is_empty(), "{:?}", list.warnings);
    assert_eq!(
        list.entries[3].reason,
        Reason::SharedLibrary {
            name: "libfoo.so.1".to_owned(),
            needed_by: ImagePath::new("/opt/app/bin/prog"),
        }
    );

    // Without the conf include, libbar is reported, not guessed.
    fs::remove_file(r.join("etc/ld.so.conf.d/other.conf")).unwrap();
    let list = analyze_entrypoint(&view, &config(&["/opt/app/bin/prog"], "/", &[])).unwrap();
    assert!(!list.contains("/opt/other/lib/libbar.so"));
    assert!(
        list.warnings
            .iter()
            .any(|w| matches!(w, Warning::LibraryNotFound { name, .. } if name == "libbar.so"))
    );
    // /etc/ld.so.preload is read, and what it names is loaded with its own needs.
    fs::write(
        r.join("etc/ld.so.preload"),
        "/opt/other/lib/libbar.so # comment\n",
    )
    .unwrap();
    let list = analyze_entrypoint(&view, &config(&["/opt/app/bin/prog"], "/", &[])).unwrap();
    assert_has(&list, "/etc/ld.so.preload");
    assert_has(&list, "/opt/other/lib/libbar.so");
    assert!(list.warnings.is_empty(), "{:?}", list.warnings);
    fs::remove_file(r.join("etc/ld.so.preload")).unwrap();
    // LD_LIBRARY_PATH from the image config is searched too.
    let list = analyze_entrypoint(
        &view,
        &config(
            &["/opt/app/bin/prog"],
            "/",
            &["LD_LIBRARY_PATH=/opt/other/lib"],
        ),
    )
    .unwrap();
    assert!(list.contains("/opt/other/lib/libbar.so"));
}

/// A venv found through `PATH`: its `pyvenv.cfg`, its site-packages instead of the
/// system's, and `-c` / `-m` forms.
#[test]
fn python_venv_in_path_with_c_and_m() {
    let dir = tempfile::tempdir().unwrap();
    let base = canonical(dir.path().to_str().unwrap());
    let base = Path::new(&base);
    let site = base.join("venv/lib/python3.11/site-packages");
    fs::create_dir_all(base.join("venv/bin")).unwrap();
    fs::create_dir_all(site.join("mypkg")).unwrap();
    symlink("/usr/bin/python3.11", base.join("venv/bin/python")).unwrap();
    fs::write(base.join("venv/pyvenv.cfg"), "home = /usr/bin\n").unwrap();
    fs::write(
        site.join("mypkg/__init__.py"),
        "from . import helpers\nimport colorsys\n",
    )
    .unwrap();
    fs::write(site.join("mypkg/helpers.py"), "import textwrap\n").unwrap();
    fs::write(site.join("mypkg/__main__.py"), "import shlex\n").unwrap();
    let path_env = format!("PATH={}:/usr/bin:/bin", base.join("venv/bin").display());
    let b = |rel: &str| base.join(rel).to_string_lossy().into_owned();

    let list = analyze_entrypoint(
        &host(),
        &config(&["python", "-c", "import mypkg"], "/", &[&path_env]),
    )
    .unwrap();
    assert_has(&list, &b("venv/bin/python"));
    assert_has(&list, "/usr/bin/python3.11");
    assert_has(&list, &b("venv/pyvenv.cfg"));
    assert_has(
        &list,
        &b("venv/lib/python3.11/site-packages/mypkg/__init__.py"),
    );
    assert_has(
        &list,
        &b("venv/lib/python3.11/site-packages/mypkg/helpers.py"),
    );
    assert_has(&list, "/usr/lib/python3.11/colorsys.py");
    assert_has(&list, "/usr/lib/python3.11/textwrap.py");
    assert!(!list.contains(&b("venv/lib/python3.11/site-packages/mypkg/__main__.py")));
    assert!(
        !list
            .paths()
            .any(|p| p.as_str().starts_with("/usr/lib/python3/dist-packages")),
        "a venv does not see the system site-packages"
    );

    let list = analyze_entrypoint(
        &host(),
        &config(&["python", "-m", "mypkg"], "/", &[&path_env]),
    )
    .unwrap();
    assert_has(
        &list,
        &b("venv/lib/python3.11/site-packages/mypkg/__main__.py"),
    );
    assert_has(&list, "/usr/lib/python3.11/shlex.py");

    // A console script (what `pip install` writes) serving `web:app` from the cwd.
    write_script(
        &base.join("venv/bin"),
        "server",
        &format!(
            "#!{}\nimport sys\nfrom mypkg import helpers\n",
            b("venv/bin/python")
        ),
    );
    fs::create_dir_all(base.join("srv")).unwrap();
    fs::write(base.join("srv/web.py"), "import html\napp = None\n").unwrap();
    let list = analyze_entrypoint(
        &host(),
        &config(&["server", "-b", ":80", "web:app"], &b("srv"), &[&path_env]),
    )
    .unwrap();
    assert_eq!(first_of_command(&list).path.as_str(), b("venv/bin/server"));
    assert_has(&list, &b("venv/pyvenv.cfg"));
    assert_has(
        &list,
        &b("venv/lib/python3.11/site-packages/mypkg/helpers.py"),
    );
    assert_has(&list, &b("srv/web.py"));
    assert_has(&list, "/usr/lib/python3.11/html/__init__.py");
}

/// Runs `argv` under strace in `cwd` and returns the regular files it opened
/// (canonical paths), or `None` where strace is missing or cannot trace (no
/// ptrace in the sandbox).
fn traced_opens(argv: &[&str], cwd: &Path) -> Option<Vec<String>> {
    let out = tempfile::tempdir().unwrap();
    let trace = out.path().join("trace");
    let ran = std::process::Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=open,openat", "-o"])
        .arg(&trace)
        .args(argv)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", analyze::DEFAULT_PATH)
        // What runc sets from /etc/passwd when the image does not.
        .env("HOME", "/root")
        .status();
    if !ran.is_ok_and(|status| status.success()) {
        eprintln!("strace unavailable or not permitted here; nothing compared");
        return None;
    }
    let trace = fs::read_to_string(trace).unwrap();
    let mut files = Vec::new();
    for line in trace.lines() {
        // `PID openat(AT_FDCWD, "/path", O_RDONLY|O_CLOEXEC) = 3`
        let Some((_, rest)) = line.split_once('"') else {
            continue;
        };
        let Some((path, result)) = rest.split_once('"') else {
            continue;
        };
        if result.contains("= -1") || path.starts_with("/proc") || path.starts_with("/dev") {
            continue;
        }
        let path = cwd.join(path);
        if fs::metadata(&path).is_ok_and(|meta| meta.is_file()) {
            files.push(canonical(path.to_str().unwrap()));
        }
    }
    Some(files)
}

/// Ground truth: every regular file a start really opens (as `strace` records it)
/// is in the static list, for python run directly, through `sh -c`, and through
/// an `env` shebang.
#[test]
fn starts_match_strace() {
    let dir = tempfile::tempdir().unwrap();
    let base = canonical(dir.path().to_str().unwrap());
    let base = Path::new(&base);
    let script = write_script(base, "script.py", SCRIPT_IMPORTS);
    let tool = write_script(
        base,
        "tool",
        &format!("#!/usr/bin/env python3\n{SCRIPT_IMPORTS}"),
    );
    let base_str = base.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["/usr/bin/python3", &script],
        vec![
            "/usr/bin/python3",
            "-c",
            "import ssl, sqlite3, ctypes, asyncio",
        ],
        vec!["/bin/sh", "-c", "exec python3 script.py"],
        vec![&tool],
    ];
    for argv in cases {
        let Some(opened) = traced_opens(&argv, base) else {
            return;
        };
        assert!(
            opened.len() > 40,
            "{argv:?}: only {} files in the trace",
            opened.len()
        );
        let list = analyze_entrypoint(&host(), &config(&argv, base_str, &[])).unwrap();
        let listed: std::collections::HashSet<&str> = list.files().map(|p| p.as_str()).collect();
        for file in &opened {
            assert!(
                listed.contains(file.as_str()),
                "{argv:?} opened {file}, not in the list"
            );
        }
    }
}
