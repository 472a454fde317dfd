"""Turn a CUDA C++ source into a shared library the emu runtime can run.

Steps: refuse constructs the runtime does not support (with the construct's
name and line), rewrite ``extern __shared__`` arrays to the launch's dynamic
shared memory, append one ``extern "C"`` entry point per kernel, compile the
result with g++ after the prelude ``runtime/cuda_emu.h`` (kernel code
instrumented with ``-fsanitize=thread``, whose hooks the runtime defines),
link it with the runtime object, and cache the library on disk and in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import EmuCompileError

RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
_CACHE_VERSION = "4"

# Flags for the kernel translation unit.  -O1 keeps compile times short; the
# sanitizer calls dominate run time anyway.  The thread sanitizer's
# instrumentation (not its run-time library: the hooks are emu's) calls a hook
# before every load and store the compiler cannot prove local, and a separate
# one for volatile accesses.
_KERNEL_FLAGS = (
    "-O1", "-fno-tree-sra", "-fPIC", "-fno-strict-aliasing", "-fvisibility=hidden", "-fno-exceptions", "-w",
    "-fsanitize=thread",
    "--param", "tsan-distinguish-volatile=1",
    "--param", "tsan-instrument-func-entry-exit=0",
)
_RUNTIME_FLAGS = ("-O2", "-fPIC", "-fvisibility=hidden", "-Wall")
_LINK_FLAGS = ("-shared", "-Wl,-Bsymbolic", "-Wl,-z,noexecstack", "-Wl,--wrap=memcpy,--wrap=memmove,--wrap=memset")
_LINK_LIBS = ("-lrt",)    # timer_create (the runtime's watchdog) before glibc 2.34


# ---------------------------------------------------------------- compiler discovery
@dataclass(frozen=True)
class Compiler:
    path: str
    version: str


_compiler: Optional[Compiler] = None
_compiler_lock = threading.Lock()


def find_compiler() -> Compiler:
    """The C++ compiler emu uses: ``$CXX`` if set, else ``g++``.  GCC 11 or newer
    is required (its thread-sanitizer instrumentation provides the memory-access
    hooks, with volatile accesses told apart)."""
    global _compiler
    with _compiler_lock:
        if _compiler is not None and _compiler.path == _wanted_compiler():
            return _compiler
        wanted = _wanted_compiler()
        path = shutil.which(wanted)
        if path is None:
            raise EmuCompileError(
                f"the emu backend needs a C++ compiler (GCC) and {wanted!r} was not found; "
                "install g++ or set the CXX environment variable to one")
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        except OSError as exc:
            raise EmuCompileError(f"cannot run the C++ compiler {path!r}: {exc}") from exc
        version = out.stdout.strip()
        major = re.search(r"\)\s+(\d+)\.", version.splitlines()[0] if version else "")
        if (out.returncode != 0 or "Free Software Foundation" not in version or "clang" in version.lower()
                or major is None or int(major.group(1)) < 11):
            raise EmuCompileError(
                f"the emu backend needs GCC (g++ 11 or newer); {path!r} reports: "
                f"{version.splitlines()[0] if version else out.stderr.strip()}")
        _compiler = Compiler(path, version.splitlines()[0])
        return _compiler


def _wanted_compiler() -> str:
    return os.environ.get("CXX", "").strip() or "g++"


# ---------------------------------------------------------------- options
@dataclass(frozen=True)
class ParsedOptions:
    include_dirs: Tuple[str, ...]
    defines: Tuple[str, ...]
    std: str


_STD_OK = {"c++17": "gnu++17", "c++20": "gnu++20", "c++2a": "gnu++2a", "gnu++17": "gnu++17", "gnu++20": "gnu++20"}


def parse_options(options: Sequence[str]) -> ParsedOptions:
    """Honour -I and -D (and -U), map -std, accept and ignore NVRTC-only flags."""
    if isinstance(options, str):
        options = (options,)
    includes: List[str] = []
    defines: List[str] = []
    std = "gnu++17"
    opts = list(options)
    i = 0
    while i < len(opts):
        opt = opts[i]
        if not isinstance(opt, str):
            raise TypeError(f"options must be strings, got {type(opt).__name__} at index {i}")

        def value(prefixes):
            nonlocal i
            for p in prefixes:
                if opt == p.rstrip("="):
                    if i + 1 >= len(opts):
                        raise ValueError(f"option {opt!r} needs a value")
                    i += 1
                    return opts[i]
                if opt.startswith(p):
                    return opt[len(p):]
            return None

        inc = value(("--include-path=", "-I"))
        if inc is not None:
            includes.append(os.path.abspath(inc))
        else:
            d = value(("--define-macro=", "-D"))
            if d is not None:
                defines.append("-D" + d)
            else:
                u = value(("--undefine-macro=", "-U"))
                if u is not None:
                    defines.append("-U" + u)
                elif opt.startswith(("-std=", "--std=")):
                    std = _STD_OK.get(opt.split("=", 1)[1], "gnu++17")
                # everything else (-arch, --use_fast_math, -lineinfo, ...) is NVRTC-only
        i += 1
    return ParsedOptions(tuple(includes), tuple(defines), std)


# ---------------------------------------------------------------- source analysis
_COMMENT_OR_STRING = re.compile(
    r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)


def _blank(m: re.Match) -> str:
    text = m.group(0)
    if text.startswith(("/", )):
        return re.sub(r"[^\n]", " ", text)
    return text[0] + re.sub(r"[^\n]", " ", text[1:-1]) + text[-1]


def code_only(source: str) -> str:
    """The source with comments and string contents blanked (same offsets)."""
    return _COMMENT_OR_STRING.sub(_blank, source)


# construct -> (regex over code_only text, explanation)
_REFUSED = (
    (r"\b(?:asm|__asm__|__asm)\b\s*(?:volatile\b|__volatile__\b)?\s*\(", "inline assembly (asm)",
     "PTX cannot run on the CPU"),
    (r"\bcooperative_groups\b|\bcg::|\bthis_grid\s*\(", "cooperative groups", "not supported by the emu runtime"),
    (r"\btexture\s*<|\b(?:tex|surf)[123]D\w*\s*(?:<[^<>;]*>)?\s*\(|\bcuda(?:Texture|Surface)Object_t\b",
     "textures and surfaces", "not supported by the emu runtime"),
    (r"\b__managed__\b", "__managed__ memory", "not supported by the emu runtime"),
    (r"\b__constant__\b[^=;{}()]*;", "__constant__ variables without an initializer",
     "emu cannot set them from the host; give them an initializer"),
    (r"<<<", "dynamic parallelism (a launch inside a kernel)", "not supported by the emu runtime"),
    (r"\bnvcuda::wmma\b|\bwmma::", "warp matrix functions (wmma)", "not supported by the emu runtime"),
    (r"\b__shfl(?:_up|_down|_xor)?\s*\(|\b__ballot\s*\(|\b__any\s*\(|\b__all\s*\(",
     "legacy warp intrinsics without _sync", "use the *_sync versions (CUDA 9+)"),
    (r"\b__device__\s+(?!__forceinline__|inline|static|__noinline__|constexpr|const\b)[\w:<>,\s*&]+?\b\w+\s*(?:\[[^\]]*\]\s*)*(?:=[^;(]*)?;",
     "__device__ global variables", "kernels may only use their arguments and shared memory"),
)

_EXTERN_SHARED = re.compile(
    r"\bextern\s+(?:__shared__\s+)((?:[^;\[\]{}()]|\((?:[^;()]|\([^;()]*\))*\))*?)\s*\b([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_EXTERN_C_KERNEL = re.compile(
    r'\bextern\s+"[C ]"\s*(?:\{\s*)?(?:static\s+)?__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
    r'void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(')


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def check_supported(source: str, filename: str, first_line: int = 1, lines=None) -> None:
    """Refuse the constructs emu does not support, naming file, line and construct.
    ``lines`` maps a line index of ``source`` to its line number in ``filename``."""
    code = code_only(source)
    for pattern, construct, why in _REFUSED:
        m = re.search(pattern, code)
        if m:
            k = _line_of(code, m.start()) - 1
            line = lines[k] if lines is not None else first_line + k
            raise EmuCompileError(
                f"{filename}:{line}: {construct} is not supported by the emu backend "
                f"({why}): {source[m.start():m.end()].strip()!r}")


_LINE_MARKER = re.compile(r'^#\s+(\d+)\s+"((?:\\.|[^"\\])*)"')


def check_preprocessed(text: str, files: Sequence[str]) -> None:
    """Run the refusals over preprocessed text (so code in `#if` branches the emu
    build does not take is not refused), restricted to lines of ``files`` (the
    source and the project's headers; system headers are not checked)."""
    wanted = set(files) | {os.path.realpath(f) for f in files}
    checked: Dict[str, bool] = {}
    chunks: Dict[str, Tuple[List[str], List[int]]] = {}
    current, line = None, 0
    for raw in text.split("\n"):
        m = _LINE_MARKER.match(raw)
        if m:
            line = int(m.group(1))
            current = m.group(2).encode().decode("unicode_escape")
            if current not in checked:
                checked[current] = current in wanted or os.path.realpath(current) in wanted
            continue
        if checked.get(current):
            body, numbers = chunks.setdefault(current, ([], []))
            body.append(raw)
            numbers.append(line)
        line += 1
    for name, (body, numbers) in chunks.items():
        check_supported("\n".join(body), name, lines=numbers)


def _namespace_scope(code: str, pos: int) -> bool:
    """Whether ``pos`` is at namespace scope (every open brace before it opens a
    namespace or an ``extern "C"`` block)."""
    stack = []
    for m in re.finditer(r"[{}]", code[:pos]):
        if m.group() == "}":
            if stack:
                stack.pop()
            continue
        head = code[max(0, m.start() - 200):m.start()]
        stack.append(bool(re.search(r'(?:\bnamespace\s*[\w:]*|\bextern\s+"[C ]")\s*$', head)))
    return all(stack)


def rewrite_dynamic_shared(source: str) -> str:
    """``extern __shared__ T name[];`` -> the launch's dynamic shared memory
    (16-byte aligned) as a ``T*``: a local pointer in a function, a macro at
    namespace scope.  Line numbers are kept."""
    code = code_only(source)
    out = []
    last = 0
    for m in _EXTERN_SHARED.finditer(code):
        text = source[m.start():m.end()]
        ctype = re.sub(r"__align__\s*\((?:[^()]|\([^()]*\))*\)|__attribute__\s*\(\(.*?\)\)", " ",
                       source[m.start(1):m.end(1)])
        ctype = " ".join(ctype.split())
        name = m.group(2)
        cast = f"reinterpret_cast<{ctype}*>(::gpubn_emu::dynamic_smem())"
        if _namespace_scope(code, m.start()):
            repl = f"\n#define {name} ({cast})\n#line {_line_of(source, m.end())}\n"
        else:
            repl = f"{ctype}* const {name} = {cast};" + "\n" * text.count("\n")
        out.append(source[last:m.start()])
        out.append(repl)
        last = m.end()
    out.append(source[last:])
    return "".join(out)


_STATIC_SHARED = re.compile(r"\b__shared__\b")
_SHARED_DECLARATOR = re.compile(r"\b([A-Za-z_]\w*)\s*((?:\[[^\[\];]*\]\s*)*)$")
_TRAILING_ATTRIBUTES = re.compile(
    r"(?:\s*(?:__align__\s*\((?:[^()]|\([^()]*\))*\)|__attribute__\s*\(\((?:[^()]|\([^()]*\))*\)\)))+\s*$")
SHARED_STORAGE_PREFIX = "gpubn_emu_smem_"


def _in_directive(code: str, pos: int) -> bool:
    """Whether ``pos`` is on a preprocessor line (continuation lines included)."""
    start = code.rfind("\n", 0, pos) + 1
    while start > 1 and code[start - 2] == "\\":
        start = code.rfind("\n", 0, start - 1) + 1
    return code[start:pos].lstrip().startswith("#")


def _split_top_level(code: str, lo: int, hi: int) -> Optional[List[Tuple[int, int]]]:
    """[lo, hi) split at commas outside brackets and template arguments; None
    when the text holds something other than declarators (an initializer)."""
    parts, depth, angle, start = [], 0, 0, lo
    for i in range(lo, hi):
        c = code[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and c == "<":
            angle += 1
        elif depth == 0 and c == ">":
            angle -= 1
        elif depth == 0 and angle == 0 and c == "=":
            return None
        elif depth == 0 and angle == 0 and c == ",":
            parts.append((start, i))
            start = i + 1
    parts.append((start, hi))
    return parts


def rewrite_static_shared(source: str) -> str:
    """``__shared__ T name[N];`` -> ``__shared__ T gpubn_emu_smem_name[N];`` plus a
    static reference ``name`` to it.

    The prefix marks the kernel's shared variables in the library's symbol
    table (their sizes, the names in reports); every access through the
    reference is an instrumented load or store of the storage, also at offsets
    the compiler can prove in bounds (``s[0] = v`` or a ``__shared__`` scalar).
    Declarations the rewrite does not understand are left alone.  Line numbers
    are kept."""
    code = code_only(source)
    edits = []                               # (start, end, replacement), in order
    for m in _STATIC_SHARED.finditer(code):
        if re.search(r"\bextern\s+$", code[max(0, m.start() - 40):m.start()]) or _in_directive(code, m.start()):
            continue
        depth, end = 0, None
        for i in range(m.end(), len(code)):
            c = code[i]
            if c in "([":
                depth += 1
            elif c in ")]":
                depth -= 1
            elif c in "{}" or c == "#":
                break
            elif c == ";" and depth == 0:
                end = i
                break
        if end is None:
            continue
        parts = _split_top_level(code, m.end(), end)
        if parts is None:
            continue
        names = []
        for lo, hi in parts:
            seg = code[lo:hi]
            attrs = _TRAILING_ATTRIBUTES.search(seg)
            if attrs:
                seg = seg[:attrs.start()]
            d = _SHARED_DECLARATOR.search(seg)
            if d is None or (lo == m.end() and not seg[:d.start()].strip()):
                names = None                 # no declarator name (or no type before it)
                break
            names.append((lo + d.start(1), lo + d.end(1), d.group(1)))
        if not names:
            continue
        for lo, hi, name in names:
            edits.append((lo, hi, SHARED_STORAGE_PREFIX + name))
        # a static reference: lambdas use it without capturing it, as they would the variable
        refs = "".join(f" static auto& {name} = ::gpubn_emu::shared_ref(&{SHARED_STORAGE_PREFIX}{name});"
                       for _, _, name in names)
        edits.append((end + 1, end + 1, refs))
    out, last = [], 0
    for lo, hi, text in edits:
        out.append(source[last:lo])
        out.append(text)
        last = hi
    out.append(source[last:])
    return "".join(out)


def rewrite_shared(source: str) -> str:
    """Both shared-memory rewrites emu applies to kernel sources and project headers."""
    return rewrite_static_shared(rewrite_dynamic_shared(source))


def extern_c_kernels(source: str) -> List[str]:
    return [m.group(1) for m in _EXTERN_C_KERNEL.finditer(code_only(source))]


_WRAPPER_HEAD = r"""
namespace gpubn_emu_entry {
template <class T> using arg_t = typename std::remove_cv<typename std::remove_reference<T>::type>::type;
template <class... A, size_t... I>
__attribute__((no_sanitize_thread)) static void invoke(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<arg_t<A>*>(args[I])...);
}
template <class T> constexpr long long kind() {
    return std::is_pointer<T>::value ? 1 : std::is_floating_point<T>::value ? 3
         : (std::is_integral<T>::value || std::is_enum<T>::value) ? 2 : 4;
}
// info[0] = parameter count, then (sizeof, kind) per parameter
template <class... A> static long long* info(void (*)(A...)) {
    static long long v[] = {(long long)sizeof...(A), ((long long)sizeof(arg_t<A>))..., kind<arg_t<A>>()..., 0};
    return v;
}
}  // namespace gpubn_emu_entry
"""


def entry_points(kernels: Sequence[str]) -> str:
    parts = [_WRAPPER_HEAD, r"""
namespace gpubn_emu_entry {
template <class... A> static void run(void (*k)(A...), void** args) { invoke(k, args, std::index_sequence_for<A...>{}); }
}  // namespace gpubn_emu_entry
"""]
    for i, expr in enumerate(kernels):
        parts.append(
            f'extern "C" __attribute__((visibility("default"))) void gpubn_emu_thunk_{i}(void** a) '
            f"{{ ::gpubn_emu_entry::run(&{expr}, a); }}\n"
            f'extern "C" __attribute__((visibility("default"))) long long* gpubn_emu_info_{i}() '
            f"{{ return ::gpubn_emu_entry::info(&{expr}); }}\n")
    return "".join(parts)


# ---------------------------------------------------------------- caching
def cache_dir() -> Path:
    from ..kernels import cache_dir as kernels_cache_dir

    return Path(kernels_cache_dir("emu"))


def _runtime_sources() -> bytes:
    h = hashlib.sha256()
    for p in sorted(RUNTIME_DIR.glob("*")):
        if p.suffix in (".h", ".cpp"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.digest()


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*([<"])([^>"\n]+)[>"]', re.M)


@dataclass
class Header:
    spelling: str          # as written in the #include
    path: Path             # the file found
    text: str
    mirror: Optional[str]  # where a copy goes in the build directory (relative), None: cannot mirror


def collect_headers(source: str, include_dirs: Sequence[str]) -> List[Header]:
    """The project headers a source includes (recursively): those found next to
    the including header or in the -I directories, as the compiler searches them.
    System headers are not followed."""
    out: List[Header] = []
    seen: Dict[Path, Header] = {}
    todo = [(source, None, "")]          # text, its directory, its mirror directory
    while todo:
        text, here, mirror_dir = todo.pop()
        for m in _INCLUDE.finditer(text):
            kind, name = m.group(1), m.group(2).strip()
            candidates = ([(here, mirror_dir)] if kind == '"' and here is not None else []) + \
                [(Path(d), "") for d in include_dirs]
            for base, mbase in candidates:
                p = base / name
                if not p.is_file():
                    continue
                rp = p.resolve()
                mirror = os.path.normpath(os.path.join(mbase, name))
                if os.path.isabs(name) or mirror.startswith(".."):
                    mirror = None
                if rp not in seen:
                    h = Header(name, rp, rp.read_text(encoding="utf-8", errors="replace"), mirror)
                    seen[rp] = h
                    out.append(h)
                    todo.append((h.text, rp.parent, os.path.dirname(mirror) if mirror else ""))
                break
    return out


def _run(cmd: List[str], what: str, source_name: str) -> None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise EmuCompileError(f"cannot run the C++ compiler: {exc}") from exc
    if out.returncode != 0:
        log = (out.stderr or "") + (out.stdout or "")
        raise EmuCompileError(f"emu: compiling {source_name} failed ({what}):\n{log.strip()}", log)


def _atomic_write_target(dest: Path):
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return tmp


_build_lock = threading.Lock()


def _runtime_flags() -> Tuple[str, ...]:
    """GPUBN_EMU_FIBERS=ucontext selects the portable fiber switch (the default on
    processors other than x86-64) -- for testing it on x86-64."""
    fibers = os.environ.get("GPUBN_EMU_FIBERS", "").strip().lower()
    if fibers not in ("", "asm", "ucontext"):
        raise ValueError(f"GPUBN_EMU_FIBERS must be 'asm' or 'ucontext', got {fibers!r}")
    return _RUNTIME_FLAGS + (("-DGPUBN_EMU_UCONTEXT",) if fibers == "ucontext" else ())


def _runtime_object(cc: Compiler) -> Path:
    flags = _runtime_flags()
    key = hashlib.sha256(
        b"\0".join([_CACHE_VERSION.encode(), cc.path.encode(), cc.version.encode(), _runtime_sources(),
                    " ".join(flags).encode()])).hexdigest()[:24]
    dest = cache_dir() / f"runtime-{key}.o"
    if dest.exists():
        return dest
    tmp = _atomic_write_target(dest)
    try:
        _run([cc.path, "-std=gnu++17", *flags, "-I", str(RUNTIME_DIR), "-c",
              str(RUNTIME_DIR / "runtime.cpp"), "-o", tmp], "runtime", "the emu runtime")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


@dataclass
class Built:
    path: Path
    kernels: Tuple[str, ...]          # entry index -> name expression / extern "C" name


_memory_cache: Dict[str, Built] = {}


def build(source: str, options: Sequence[str], name_expressions: Sequence[str],
          filename: str = "kernel.cu") -> Built:
    """Compile ``source`` (cached) and return the library path and its kernels."""
    opts = parse_options(options)
    headers = collect_headers(source, opts.include_dirs)
    kernels = tuple(dict.fromkeys(list(name_expressions) + extern_c_kernels(source)))
    cc = find_compiler()
    key = hashlib.sha256(b"\0".join([
        _CACHE_VERSION.encode(), cc.path.encode(), cc.version.encode(), _runtime_sources(),
        " ".join(_KERNEL_FLAGS + _LINK_FLAGS + _LINK_LIBS + _runtime_flags()).encode(), repr(opts).encode(), repr(kernels).encode(),
        *[str(h.path).encode() + b"\0" + h.text.encode() for h in headers],
        filename.encode(), source.encode()])).hexdigest()[:32]
    with _build_lock:
        hit = _memory_cache.get(key)
        if hit is not None:
            return hit
        dest = cache_dir() / f"module-{key}.so"
        if not dest.exists():
            runtime_o = _runtime_object(cc)
            tu = (f'#line 1 "{filename}"\n' + rewrite_shared(source) +
                  '\n#line 1 "<emu entry points>"\n' + entry_points(kernels))
            tmp = _atomic_write_target(dest)
            workdir = tempfile.mkdtemp(prefix="build-", dir=dest.parent)
            try:
                include = [f"-I{d}" for d in opts.include_dirs]
                # refusals, on the preprocessed source and project headers
                check_path = os.path.join(workdir, "check.cpp")
                Path(check_path).write_text(f'#line 1 "{filename}"\n' + source)
                pre = subprocess.run([cc.path, f"-std={opts.std}", "-E", "-DGPUBN_EMU=1", *include, *opts.defines,
                                      "-x", "c++", check_path], capture_output=True, text=True)
                if pre.returncode != 0:
                    log = pre.stderr + pre.stdout
                    raise EmuCompileError(f"emu: compiling {filename} failed (preprocessing):\n{log.strip()}", log)
                check_preprocessed(pre.stdout, [filename] + [str(h.path) for h in headers])
                src_path = os.path.join(workdir, "kernel.cpp")
                Path(src_path).write_text(tu)
                if any(_STATIC_SHARED.search(code_only(h.text)) for h in headers):
                    # Headers declaring `__shared__` variables are rewritten too: the
                    # build directory mirrors the project headers (it is searched
                    # first, and headers find their neighbours there).
                    for h in headers:
                        if h.mirror is None:
                            continue
                        copy = Path(workdir) / h.mirror
                        copy.parent.mkdir(parents=True, exist_ok=True)
                        copy.write_text(f'#line 1 "{h.path}"\n' + rewrite_shared(h.text))
                    include = [f"-I{workdir}"] + include
                # compiled and linked apart: linked with -fsanitize=thread, the
                # driver would add the sanitizer's run-time library
                obj = os.path.join(workdir, "kernel.o")
                cmd = [cc.path, f"-std={opts.std}", *_KERNEL_FLAGS, "-include", str(RUNTIME_DIR / "cuda_emu.h"),
                       *include, *opts.defines, "-x", "c++", "-c", src_path, "-o", obj]
                _run(cmd, "kernel source", filename)
                _run([cc.path, *_LINK_FLAGS, obj, str(runtime_o), *_LINK_LIBS, "-o", tmp], "kernel source", filename)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
                if os.path.exists(tmp):
                    os.unlink(tmp)
        built = Built(dest, kernels)
        _memory_cache[key] = built
        return built
