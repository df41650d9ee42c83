// The browser bundle: src/index.ts through esbuild, minified ESM, written to dist/secure-ws-client.min.js.
//   node scripts/bundle.mjs                 build it and print {"bytes":…,"gzip":…}
//   node scripts/bundle.mjs --out FILE      also copy it to FILE (the Python package serves it at /demo)
//   node scripts/bundle.mjs --max-gzip N    fail when the gzip size passes N bytes
import { build } from "esbuild";
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const here = join(dirname(fileURLToPath(import.meta.url)), "..");
const args = process.argv.slice(2);
const option = (name) => (args.includes(name) ? args[args.indexOf(name) + 1] : undefined);

const result = await build({
  entryPoints: [join(here, "src/index.ts")],
  bundle: true,
  format: "esm",
  minify: true,
  target: "es2020",
  legalComments: "none",
  write: false,
  logLevel: "error",
});
const code = result.outputFiles[0].contents;
mkdirSync(join(here, "dist"), { recursive: true });
writeFileSync(join(here, "dist/secure-ws-client.min.js"), code);
const out = option("--out");
if (out) writeFileSync(out, code);
const size = { bytes: code.length, gzip: gzipSync(code, { level: 9 }).length };
console.log(JSON.stringify(size));
const max = option("--max-gzip");
if (max && size.gzip > Number(max)) {
  console.error(`bundle is ${size.gzip} bytes gzipped, over the ${max} byte budget`);
  process.exit(1);
}
