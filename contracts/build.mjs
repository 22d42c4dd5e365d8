#!/usr/bin/env node
// Compiles every .sol file under contracts/src with solc-js and writes one artifact per deployable contract to
// escrow/artifacts/<ContractName>.json ({contractName, sourceName, abi, bytecode, deployedBytecode}), plus the
// canonical EntryPoint v0.7 taken verbatim from the @account-abstraction npm package.
//
//   node contracts/build.mjs           write artifacts, delete stale ones
//   node contracts/build.mjs --check   compile in memory; exit 1 listing drifted, missing and stale files (CI)
//
// Why this shape:
// - Each source file is its own compilation (with its imports). Broken files then cannot hide the others, and
//   a contract's bytecode never depends on which unrelated files happen to sit next to it. Files compile in
//   parallel worker threads, one solc-js instance per thread.
// - Compiler settings (evm_version, optimizer, optimizer_runs, via_ir, and the via_ir and optimizer_runs of its
//   compilation_restrictions) are read from foundry.toml, so forge tests and the committed artifacts use the
//   same ones.
// - metadata.bytecodeHash = "none": no hash of the metadata (which embeds absolute paths and comments) ends up
//   in the bytecode, so artifacts are byte-for-byte reproducible on any machine.
// - EntryPoint is copied, not compiled: deploying exactly the npm initcode through the CREATE2 deployer
//   0x4e59b44847b379578588920ca78fbf26c0b4956c with the canonical salt is what lands it at
//   0x0000000071727De22E5E9d8BAf0edAc6f37da032.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";

const CONTRACTS_DIR = path.dirname(fileURLToPath(import.meta.url));
const REPO_DIR = path.dirname(CONTRACTS_DIR);
const NODE_MODULES = path.join(REPO_DIR, "node_modules");
const SRC_DIR = path.join(CONTRACTS_DIR, "src");
const ARTIFACTS_DIR = path.join(REPO_DIR, "escrow", "artifacts");
const ENTRYPOINT_ARTIFACT = path.join(NODE_MODULES, "@account-abstraction", "contracts", "artifacts", "EntryPoint.json");

// Import prefixes served from node_modules (the same remappings as foundry.toml).
const LIBRARY_PREFIXES = ["@openzeppelin/contracts/", "@account-abstraction/contracts/"];

/** Maps a solc source unit name to a file on disk. Units are named relative to contracts/ ("src/Foo.sol"). */
function resolveSource(unitName) {
  if (LIBRARY_PREFIXES.some((prefix) => unitName.startsWith(prefix))) return path.join(NODE_MODULES, unitName);
  return path.join(CONTRACTS_DIR, unitName);
}

function findImports(unitName) {
  const file = resolveSource(unitName);
  try {
    return { contents: fs.readFileSync(file, "utf8") };
  } catch {
    return { error: `File not found: ${unitName} (looked at ${path.relative(REPO_DIR, file)})` };
  }
}

// ---------------------------------------------------------------------------------------------- worker side

if (!isMainThread) {
  const solc = createRequire(import.meta.url)(path.join(NODE_MODULES, "solc"));
  parentPort.on("message", ({ unitName, settings }) => {
    const input = {
      language: "Solidity",
      sources: { [unitName]: { content: fs.readFileSync(resolveSource(unitName), "utf8") } },
      settings: {
        ...settings,
        outputSelection: {
          [unitName]: {
            "": ["ast"],
            "*": ["abi", "evm.bytecode.object", "evm.bytecode.linkReferences", "evm.deployedBytecode.object"],
          },
        },
      },
    };
    let output;
    try {
      output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
    } catch (err) {
      output = { errors: [{ severity: "error", formattedMessage: `solc-js crashed: ${err.stack || err}` }] };
    }
    parentPort.postMessage({ unitName, output });
  });
}

// ---------------------------------------------------------------------------------------------- main side

/** Reads the compiler settings from the [profile.default] table of foundry.toml (flat `key = value` lines). */
function readFoundrySettings() {
  const text = fs.readFileSync(path.join(CONTRACTS_DIR, "foundry.toml"), "utf8");
  const table = text.split(/^\[/m).find((section) => section.startsWith("profile.default]"));
  if (!table) throw new Error("foundry.toml has no [profile.default] table");
  const values = {};
  for (const line of table.split("\n")) {
    const match = line.match(/^\s*([A-Za-z_]+)\s*=\s*("?)([^"#]*)\2\s*(#.*)?$/);
    if (match) values[match[1]] = match[3].trim();
  }
  const need = (key) => {
    if (!(key in values)) throw new Error(`foundry.toml [profile.default] lacks ${key}`);
    return values[key];
  };
  return {
    evmVersion: need("evm_version"),
    optimizer: { enabled: need("optimizer") === "true", runs: Number(need("optimizer_runs")) },
    viaIR: (values.via_ir ?? "false") === "true",
    metadata: { bytecodeHash: "none" },
  };
}

/**
 * Per-unit overrides of the default settings, from foundry.toml's
 * `compilation_restrictions = [{ paths = "src/X.sol", via_ir = true, optimizer_runs = N }, ...]` line: a map from
 * unit name (exact) to the settings it overrides (`viaIR`, `optimizer.runs`).
 */
function readRestrictions() {
  const text = fs.readFileSync(path.join(CONTRACTS_DIR, "foundry.toml"), "utf8");
  const line = text.split("\n").find((l) => /^\s*compilation_restrictions\s*=/.test(l));
  const restrictions = new Map();
  if (!line) return restrictions;
  for (const [, entry] of line.matchAll(/\{([^}]*)\}/g)) {
    const unit = entry.match(/paths\s*=\s*"([^"]+)"/)?.[1];
    if (!unit) continue;
    const override = {};
    if (/via_ir\s*=\s*true/.test(entry)) override.viaIR = true;
    const runs = entry.match(/(?:^|[\s,])optimizer_runs\s*=\s*(\d+)/)?.[1];
    if (runs !== undefined) override.runs = Number(runs);
    restrictions.set(unit, override);
  }
  return restrictions;
}

/** The settings `unitName` compiles with: the defaults and its overrides (see {@link readRestrictions}). */
function unitSettings(settings, override) {
  if (!override) return settings;
  const out = { ...settings };
  if (override.viaIR) out.viaIR = true;
  if (override.runs !== undefined) out.optimizer = { ...settings.optimizer, runs: override.runs };
  return out;
}

function listSources(dir) {
  const out = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...listSources(full));
    else if (entry.name.endsWith(".sol")) out.push(path.relative(CONTRACTS_DIR, full).split(path.sep).join("/"));
  }
  return out.sort();
}

/** Compiles each unit in its own worker-thread job; resolves to {unitName: solcOutput}. */
function compileAll(unitNames, settings, restrictions = new Map()) {
  const poolSize = Math.max(1, Math.min(os.availableParallelism?.() ?? os.cpus().length, unitNames.length));
  const queue = [...unitNames];
  const results = {};
  return new Promise((resolve, reject) => {
    if (queue.length === 0) return resolve(results);
    let pending = queue.length;
    for (let i = 0; i < poolSize; i++) {
      const worker = new Worker(fileURLToPath(import.meta.url));
      const next = () => {
        const unitName = queue.shift();
        if (unitName === undefined) return void worker.terminate();
        worker.postMessage({ unitName, settings: unitSettings(settings, restrictions.get(unitName)) });
      };
      worker.on("message", ({ unitName, output }) => {
        results[unitName] = output;
        if (--pending === 0) resolve(results);
        next();
      });
      worker.on("error", reject);
      next();
    }
  });
}

/** Contract kinds by name, from the unit's AST (to leave libraries out). */
function contractKinds(output, unitName) {
  const kinds = {};
  for (const node of output.sources?.[unitName]?.ast?.nodes ?? []) {
    if (node.nodeType === "ContractDefinition") kinds[node.name] = node.contractKind;
  }
  return kinds;
}

function hex(object) {
  return object.startsWith("0x") ? object : `0x${object}`;
}

function render(artifact) {
  return JSON.stringify(artifact, null, 2) + "\n";
}

async function main() {
  const check = process.argv.includes("--check");
  const settings = readFoundrySettings();
  const units = listSources(SRC_DIR);

  const started = Date.now();
  const outputs = await compileAll(units, settings, readRestrictions());

  const expected = new Map(); // file name -> rendered JSON
  const owners = new Map(); // contract name -> unit that defines it
  const problems = [];
  const failedUnits = [];

  for (const unitName of units) {
    const output = outputs[unitName];
    const diagnostics = output.errors ?? [];
    const errors = diagnostics.filter((d) => d.severity === "error");
    for (const d of diagnostics) {
      if (d.severity !== "error" && d.sourceLocation?.file?.startsWith("src/")) {
        process.stderr.write(`warning in ${unitName}:\n${d.formattedMessage}\n`);
      }
    }
    if (errors.length > 0) {
      failedUnits.push(unitName);
      process.stderr.write(`\nERROR: ${unitName} does not compile:\n`);
      for (const e of errors) process.stderr.write(`${e.formattedMessage}\n`);
      continue;
    }
    const kinds = contractKinds(output, unitName);
    for (const [name, contract] of Object.entries(output.contracts?.[unitName] ?? {})) {
      const bytecode = contract.evm.bytecode.object;
      if (!bytecode || kinds[name] === "library") continue; // interfaces, abstract contracts, libraries
      if (Object.keys(contract.evm.bytecode.linkReferences ?? {}).length > 0) {
        problems.push(`${unitName}:${name} links external libraries; make the library functions internal`);
        continue;
      }
      if (owners.has(name)) {
        problems.push(`contract name ${name} is defined in both ${owners.get(name)} and ${unitName}`);
        continue;
      }
      owners.set(name, unitName);
      expected.set(
        `${name}.json`,
        render({
          contractName: name,
          sourceName: unitName,
          abi: contract.abi,
          bytecode: hex(bytecode),
          deployedBytecode: hex(contract.evm.deployedBytecode.object),
        }),
      );
    }
  }

  if (owners.has("EntryPoint")) {
    problems.push(`contract name EntryPoint in ${owners.get("EntryPoint")} clashes with the canonical EntryPoint`);
  } else {
    const ep = JSON.parse(fs.readFileSync(ENTRYPOINT_ARTIFACT, "utf8"));
    expected.set(
      "EntryPoint.json",
      render({
        contractName: ep.contractName,
        sourceName: `@account-abstraction/contracts/${ep.sourceName.replace(/^contracts\//, "")}`,
        abi: ep.abi,
        bytecode: ep.bytecode,
        deployedBytecode: ep.deployedBytecode,
      }),
    );
  }

  for (const p of problems) process.stderr.write(`ERROR: ${p}\n`);

  fs.mkdirSync(ARTIFACTS_DIR, { recursive: true });
  const existing = fs.readdirSync(ARTIFACTS_DIR).filter((f) => f.endsWith(".json"));
  // A unit that failed to compile may define artifacts we can no longer see: do not call them stale.
  const stale = failedUnits.length > 0 ? [] : existing.filter((f) => !expected.has(f));
  const missing = [...expected.keys()].filter((f) => !existing.includes(f));
  const drifted = [...expected.keys()].filter(
    (f) => existing.includes(f) && fs.readFileSync(path.join(ARTIFACTS_DIR, f), "utf8") !== expected.get(f),
  );
  const rel = (f) => path.relative(REPO_DIR, path.join(ARTIFACTS_DIR, f));
  const seconds = ((Date.now() - started) / 1000).toFixed(1);

  if (check) {
    for (const f of drifted) process.stderr.write(`drifted: ${rel(f)}\n`);
    for (const f of missing) process.stderr.write(`missing: ${rel(f)}\n`);
    for (const f of stale) process.stderr.write(`stale:   ${rel(f)}\n`);
    const dirty = drifted.length + missing.length + stale.length;
    if (dirty > 0) process.stderr.write("artifacts are out of date: run `make contracts` and commit the result\n");
    else if (failedUnits.length + problems.length === 0) {
      console.log(`${expected.size} artifacts up to date (${units.length} sources, ${seconds}s)`);
    }
    process.exit(dirty + failedUnits.length + problems.length > 0 ? 1 : 0);
  }

  for (const f of [...missing, ...drifted]) fs.writeFileSync(path.join(ARTIFACTS_DIR, f), expected.get(f));
  for (const f of stale) fs.rmSync(path.join(ARTIFACTS_DIR, f));
  console.log(
    `${expected.size} artifacts in ${path.relative(REPO_DIR, ARTIFACTS_DIR)} ` +
      `(${missing.length} new, ${drifted.length} updated, ${stale.length} removed; ${units.length} sources, ${seconds}s)`,
  );
  if (failedUnits.length + problems.length > 0) {
    process.stderr.write(`\nbuild failed: ${failedUnits.length} source(s) with errors, ${problems.length} other problem(s)\n`);
    process.exit(1);
  }
}

if (isMainThread) {
  main().catch((err) => {
    process.stderr.write(`${err.stack || err}\n`);
    process.exit(1);
  });
}
