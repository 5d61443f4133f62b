#!/usr/bin/env node
// Why: the suite has two runners (vitest, tap); CI and people want one closing line.
// Reads vitest's JSON report and the kernel suite's counts and prints
// "total: N passed, N failed" (plus skipped), exiting non-zero if anything failed or
// a report is missing.
import fs from 'node:fs';

let passed = 0;
let failed = 0;
let skipped = 0;
let missing = 0;
for (const file of process.argv.slice(2)) {
  let j;
  try {
    j = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    console.log(`${file}: no report (the runner did not finish)`);
    missing++;
    continue;
  }
  if (typeof j.numPassedTests === 'number') {
    // vitest JSON reporter
    passed += j.numPassedTests;
    failed += j.numFailedTests;
    skipped += (j.numPendingTests ?? 0) + (j.numTodoTests ?? 0);
    console.log(`${file}: ${j.numPassedTests} passed, ${j.numFailedTests} failed`);
  } else {
    passed += j.passed ?? 0;
    failed += j.failed ?? 0;
    skipped += j.skipped ?? 0;
    console.log(`${file}: ${j.passed ?? 0} passed, ${j.failed ?? 0} failed`);
  }
}
failed += missing;
console.log(`total: ${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
process.exit(failed > 0 ? 1 : 0);
