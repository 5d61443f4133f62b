// Why: what people read. Plain aligned tables for humans; every command also has --json.
// Anything shown may come from another user or a peer (names, descriptions, reasons), and a
// terminal obeys escape sequences: control characters are shown escaped, never sent raw.

// C0 controls, DEL, C1 controls, and the Unicode line separators and bidi overrides that
// can make a line read differently from what it holds.
// eslint-disable-next-line no-control-regex
const UNSAFE_RE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;
// eslint-disable-next-line no-control-regex
const UNSAFE_BUT_NEWLINE_RE = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

const NAMED: Record<string, string> = { '\n': '\\n', '\r': '\\r', '\t': '\\t' };

function escapeOne(c: string): string {
  const named = NAMED[c];
  if (named) return named;
  const code = c.charCodeAt(0);
  return code <= 0xff ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
}

/** One field (a name, a description): every control character escaped, ESC as `\x1b`, a newline as `\n`. */
export function escapeText(text: string): string {
  return text.replace(UNSAFE_RE, escapeOne);
}

/** A whole block of output: as escapeText, but its own line breaks stay. */
export function escapeOutput(text: string): string {
  return text.replace(UNSAFE_BUT_NEWLINE_RE, escapeOne);
}

export function table(headers: string[], rows: (string | number)[][]): string {
  const cells = [headers, ...rows.map((r) => r.map((c) => escapeText(String(c))))];
  const widths = headers.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  return cells.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n');
}
