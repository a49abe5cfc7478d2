// Checks the Swift package in ios/ without a Swift toolchain:
//
//  1. Syntax: every .swift file under ios/ (Package.swift, Sources, Tests) is parsed with the
//     tree-sitter Swift grammar; each ERROR or MISSING node is a failure, reported as
//     file:line:column.
//  2. The C ABI: every sparrow_* function, SPARROW_* constant and Sparrow* type named in the
//     Swift files must exist in ffi/include/sparrow.h (Sparrow* names declared in Swift, and
//     the module names of ios/xcframework/module.modulemap, are the Swift side's own); and
//     every function and constant of the header must be used by the Swift API (ios/Sources),
//     so that the wrapper stays complete.
//
//   node ios/check/check-swift.mjs [--root REPO]
//
// REPO (default: the repository of this script) holds ios/ and ffi/include/sparrow.h.
// Exits 0 when everything passes, 1 with one line per failure otherwise.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import Parser from 'web-tree-sitter';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
let root = path.resolve(here, '..', '..');
for (let i = 0; i < args.length; i++) {
    if (args[i] === '--root' && i + 1 < args.length) root = path.resolve(args[++i]);
    else {
        console.error(`usage: node check-swift.mjs [--root REPO]; unexpected argument ${args[i]}`);
        process.exit(2);
    }
}
const ios = path.join(root, 'ios');
const headerPath = path.join(root, 'ffi', 'include', 'sparrow.h');
const moduleMapPath = path.join(ios, 'xcframework', 'module.modulemap');
const rel = (p) => path.relative(root, p);

const failures = [];
const fail = (msg) => failures.push(msg);

// --- the Swift files ------------------------------------------------------------------------

// Folders of ios/ that hold no Swift source of the package.
const SKIP = new Set(['node_modules', '.build', '.swiftpm', 'build', 'check', 'SparrowFFI.xcframework']);

function swiftFiles(dir) {
    const out = [];
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
        if (SKIP.has(e.name)) continue;
        const p = path.join(dir, e.name);
        if (e.isDirectory()) out.push(...swiftFiles(p));
        else if (e.isFile() && e.name.endsWith('.swift')) out.push(p);
    }
    return out.sort();
}

const files = fs.existsSync(ios) ? swiftFiles(ios) : [];
const sources = files.filter((f) => f.startsWith(path.join(ios, 'Sources') + path.sep));
const tests = files.filter((f) => f.startsWith(path.join(ios, 'Tests') + path.sep));
if (!files.includes(path.join(ios, 'Package.swift'))) fail(`${rel(ios)}/Package.swift: missing`);
if (sources.length === 0) fail(`${rel(ios)}/Sources: no .swift file`);
if (tests.length === 0) fail(`${rel(ios)}/Tests: no .swift file`);

// --- 1. syntax ------------------------------------------------------------------------------

const require = createRequire(import.meta.url);
await Parser.init();
const Swift = await Parser.Language.load(require.resolve('tree-sitter-wasms/out/tree-sitter-swift.wasm'));
const parser = new Parser();
parser.setLanguage(Swift);

const at = (file, node) => `${rel(file)}:${node.startPosition.row + 1}:${node.startPosition.column + 1}`;

/** Calls visit on every node of the tree. */
function walk(node, visit) {
    visit(node);
    for (let i = 0; i < node.childCount; i++) walk(node.child(i), visit);
}

// Identifiers of the C ABI named in the Swift files: name -> [{file, node}].
const used = { functions: new Map(), constants: new Map(), types: new Map() };
const usedInSources = { functions: new Set(), constants: new Set() };
// Sparrow* names that the Swift files declare themselves.
const swiftDeclared = new Set();
const DECLARATIONS = new Set(['class_declaration', 'protocol_declaration', 'typealias_declaration']);

function note(map, name, file, node) {
    if (!map.has(name)) map.set(name, []);
    map.get(name).push({ file, node });
}

for (const file of files) {
    const text = fs.readFileSync(file, 'utf8');
    const tree = parser.parse(text);
    const isSource = sources.includes(file);
    walk(tree.rootNode, (node) => {
        if (node.type === 'ERROR') {
            const snippet = node.text.split('\n')[0].slice(0, 60);
            fail(`${at(file, node)}: syntax error (ERROR node at \`${snippet}\`)`);
        } else if (node.isMissing) {
            fail(`${at(file, node)}: syntax error (missing \`${node.type}\`)`);
        }
        if (DECLARATIONS.has(node.type)) {
            const name = node.childForFieldName('name');
            if (name) swiftDeclared.add(name.text);
        }
        if (node.type !== 'simple_identifier' && node.type !== 'type_identifier') return;
        const name = node.text;
        if (/^sparrow_\w+$/.test(name)) {
            note(used.functions, name, file, node);
            if (isSource) usedInSources.functions.add(name);
        } else if (/^SPARROW_\w+$/.test(name)) {
            note(used.constants, name, file, node);
            if (isSource) usedInSources.constants.add(name);
        } else if (/^Sparrow[A-Z]\w*$/.test(name)) {
            note(used.types, name, file, node);
        }
    });
    tree.delete();
}

// --- 2. the C ABI ---------------------------------------------------------------------------

/** The header without its comments, line numbers kept. */
function stripComments(src) {
    return src
        .replace(/\/\*[\s\S]*?\*\//g, (c) => c.replace(/[^\n]/g, ' '))
        .replace(/\/\/[^\n]*/g, '');
}

const lineOf = (src, index) => src.slice(0, index).split('\n').length;

const header = { functions: new Map(), constants: new Map(), types: new Map() };
if (!fs.existsSync(headerPath)) {
    fail(`${rel(headerPath)}: missing`);
} else {
    const src = stripComments(fs.readFileSync(headerPath, 'utf8'));
    for (const m of src.matchAll(/\b(sparrow_\w+)\s*\(/g)) header.functions.set(m[1], lineOf(src, m.index));
    for (const m of src.matchAll(/^\s*(SPARROW_\w+)\s*=/gm)) header.constants.set(m[1], lineOf(src, m.index));
    for (const m of src.matchAll(/\b(Sparrow[A-Z]\w*)\b/g)) {
        if (!header.types.has(m[1])) header.types.set(m[1], lineOf(src, m.index));
    }
    if (header.functions.size === 0) fail(`${rel(headerPath)}: no sparrow_* function found`);
    if (header.constants.size === 0) fail(`${rel(headerPath)}: no SPARROW_* constant found`);
}

// The Clang modules of the module map (SparrowFFI).
const modules = new Set();
if (!fs.existsSync(moduleMapPath)) {
    fail(`${rel(moduleMapPath)}: missing`);
} else {
    const map = fs.readFileSync(moduleMapPath, 'utf8');
    for (const m of map.matchAll(/\bmodule\s+(\w+)/g)) modules.add(m[1]);
    if (!/\bheader\s+"sparrow\.h"/.test(map)) fail(`${rel(moduleMapPath)}: does not name header "sparrow.h"`);
}

for (const [name, uses] of used.functions) {
    if (!header.functions.has(name)) {
        for (const u of uses) fail(`${at(u.file, u.node)}: ${name} is not a function of ${rel(headerPath)}`);
    }
}
for (const [name, uses] of used.constants) {
    if (!header.constants.has(name)) {
        for (const u of uses) fail(`${at(u.file, u.node)}: ${name} is not a constant of ${rel(headerPath)}`);
    }
}
for (const [name, uses] of used.types) {
    if (!header.types.has(name) && !swiftDeclared.has(name) && !modules.has(name)) {
        for (const u of uses) {
            fail(`${at(u.file, u.node)}: ${name} is neither a type of ${rel(headerPath)} nor declared in Swift`);
        }
    }
}
for (const [name, line] of header.functions) {
    if (!usedInSources.functions.has(name)) {
        fail(`${rel(headerPath)}:${line}: ${name} is not used by the Swift API (ios/Sources)`);
    }
}
for (const [name, line] of header.constants) {
    if (!usedInSources.constants.has(name)) {
        fail(`${rel(headerPath)}:${line}: ${name} is not used by the Swift API (ios/Sources)`);
    }
}

if (failures.length > 0) {
    for (const f of failures) console.error(f);
    console.error(`check-swift: ${failures.length} failure(s)`);
    process.exit(1);
}
console.log(
    `check-swift: ok: ${files.length} Swift files parsed; ${header.functions.size} functions and ` +
        `${header.constants.size} constants of sparrow.h all used by ios/Sources, and every C name ` +
        `in the Swift files is in the header`,
);
