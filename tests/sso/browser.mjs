// The user's browser for the SSO tests: opens the verification URL that
// `gateway login` printed, confirms the code, and signs in as ACCOUNT
// with the given amr/acr (the test provider's interaction page takes
// them from the query). Cookies are kept as a browser would.
// argv: verification_uri_complete, account, amr ("" for none), acr.
// Exits 0 when the provider said "signed in".
const [start, account, amr, acr] = process.argv.slice(2);
const jar = new Map();
function remember(res) {
  for (const c of res.headers.getSetCookie()) {
    const [pair] = c.split(';');
    const i = pair.indexOf('=');
    jar.set(pair.slice(0, i), pair.slice(i + 1));
  }
}
const cookie = () => [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
async function go(url, init = {}) {
  for (let hops = 0; hops < 20; hops++) {
    const u = new URL(url);
    if (u.pathname.startsWith('/interaction/')) {
      u.searchParams.set('account', account);
      if (amr) u.searchParams.set('amr', amr);
      if (acr) u.searchParams.set('acr', acr);
    }
    const res = await fetch(u, { ...init, redirect: 'manual', headers: { ...(init.headers || {}), cookie: cookie() } });
    remember(res);
    if (res.status >= 300 && res.status < 400) {
      url = new URL(res.headers.get('location'), u).toString();
      init = {};
      continue;
    }
    return { url: u.toString(), status: res.status, body: await res.text() };
  }
  throw new Error('too many redirects');
}
function submit(page) {
  const form = page.body.match(/<form[^>]*action="([^"]*)"[^>]*>([\s\S]*?)<\/form>/);
  if (!form) throw new Error(`no form in ${page.url}: ${page.body.slice(0, 400)}`);
  const fields = new URLSearchParams();
  for (const m of form[2].matchAll(/<input[^>]*>/g)) {
    const name = m[0].match(/name="([^"]*)"/);
    const value = m[0].match(/value="([^"]*)"/);
    if (name) fields.set(name[1], value ? value[1] : '');
  }
  return go(new URL(form[1], page.url).toString(), {
    method: 'POST',
    body: fields.toString(),
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
  });
}
let page = await go(start);
for (let step = 0; step < 5 && !page.body.includes('signed in'); step++) {
  page = await submit(page);
}
if (!page.body.includes('signed in')) {
  console.error(`not signed in: ${page.status} ${page.url}\n${page.body.slice(0, 600)}`);
  process.exit(1);
}
console.log('signed in');
