// A real OpenID Connect provider (oidc-provider) for the SSO tests, on
// loopback over HTTPS. Started and stopped by tests/tests/sso.rs.
//
// argv: port (0: any), keys.json (a JWKS with private keys; the first
// signs), cert.pem, key.pem, and a file of disabled accounts (one a line,
// read at each lookup, so a test disables a user while the provider runs:
// their refresh tokens are then refused). Prints "listening PORT" once
// serving.
// The interaction pages finish a login at once as the account and with
// the amr/acr the (test) browser puts in the interaction URL's query:
// /interaction/UID?account=alice&amr=pwd,otp&acr=...
import fs from 'node:fs';
import https from 'node:https';
import Provider from 'oidc-provider';

const [port, keysFile, certFile, keyFile, disabledFile] = process.argv.slice(2);
const disabled = (id) => {
  try {
    return fs.readFileSync(disabledFile, 'utf8').split('\n').includes(id);
  } catch {
    return false;
  }
};
const jwks = JSON.parse(fs.readFileSync(keysFile, 'utf8'));
const server = https.createServer({
  cert: fs.readFileSync(certFile),
  key: fs.readFileSync(keyFile),
});
server.listen(Number(port), '127.0.0.1', () => {
  const actual = server.address().port;
  const issuer = `https://localhost:${actual}`;
  const provider = new Provider(issuer, {
    jwks,
    clients: [{
      client_id: 'gateway',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code', 'urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
      response_types: ['code'],
      // RFC 8252 §7.3: any port of a loopback redirect URI.
      redirect_uris: ['http://127.0.0.1/callback'],
    }],
    claims: { openid: ['sub', 'acr', 'amr', 'auth_time', 'groups'], email: ['email', 'email_verified'] },
    // Claims in the ID token itself, as the issuer reads them there.
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: false },
      deviceFlow: {
        enabled: true,
        userCodeInputSource: async (ctx, form) => { ctx.body = `<html><body>${form}</body></html>`; },
        userCodeConfirmSource: async (ctx, form) => { ctx.body = `<html><body>${form}</body></html>`; },
        successSource: async (ctx) => { ctx.body = '<html><body>signed in</body></html>'; },
      },
    },
    // A disabled account is not found: its sign-ins and refresh tokens
    // are refused (invalid_grant).
    findAccount: async (ctx, id) => (disabled(id) ? undefined : {
      accountId: id,
      claims: async () => ({ sub: id, email: `${id}@example.internal`, email_verified: true, groups: ['everyone', 'sre'] }),
    }),
    ttl: { DeviceCode: 600, IdToken: 300, AccessToken: 300, RefreshToken: 3600, Session: 600, Interaction: 600, Grant: 3600 },
  });
  provider.proxy = false;
  const callback = provider.callback();
  server.on('request', async (req, res) => {
    const url = new URL(req.url, issuer);
    if (!url.pathname.startsWith('/interaction/')) {
      return callback(req, res);
    }
    try {
      const details = await provider.interactionDetails(req, res);
      const account = url.searchParams.get('account') || 'alice';
      if (details.prompt.name === 'login') {
        const login = { accountId: account };
        const amr = url.searchParams.get('amr');
        if (amr) login.amr = amr.split(',');
        const acr = url.searchParams.get('acr');
        if (acr) login.acr = acr;
        return await provider.interactionFinished(req, res, { login }, { mergeWithLastSubmission: false });
      }
      const grant = new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
      grant.addOIDCScope(details.params.scope);
      grant.addOIDCClaims(['email', 'email_verified']);
      const grantId = await grant.save();
      return await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    } catch (e) {
      res.statusCode = 500;
      res.end(String(e));
    }
  });
  console.log(`listening ${actual}`);
});
