// oidc-provider as the authorization server of tests/test_interop_oidc_provider.py.
// PORT: where to listen (127.0.0.1); JWKS_FILE: the private signing keys (JWK Set).
// Prints "listening <issuer>" once it accepts connections.
import fs from 'node:fs';
import Provider, { errors } from 'oidc-provider';

const port = Number(process.env.PORT);
const issuer = `http://127.0.0.1:${port}`;
const jwks = JSON.parse(fs.readFileSync(process.env.JWKS_FILE, 'utf8'));
const scope = 'read:things write:things admin:things';

// Resource indicators (RFC 8707): the access token format and audience per resource.
const jwt = (alg) => ({ accessTokenFormat: 'jwt', jwt: { sign: { alg } } });
const resources = {
  'https://api.example.test': jwt('RS256'),
  'https://other.example.test': jwt('RS256'),
  'https://opaque.example.test': { accessTokenFormat: 'opaque' },
  // the same API, its tokens signed with each other algorithm (keys permitting)
  'https://ps256.example.test': jwt('PS256'),
  'https://es256.example.test': jwt('ES256'),
  'https://eddsa.example.test': jwt('EdDSA'),
};

const provider = new Provider(issuer, {
  jwks,
  clients: [
    {
      client_id: 'svc',
      client_secret: 'svc-secret',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope,
    },
    {
      // the resource server's own credentials, for introspection
      client_id: 'rs-introspector',
      client_secret: 'rs:sec/ret+x=%y',
      grant_types: [],
      redirect_uris: [],
      response_types: [],
    },
  ],
  scopes: ['openid', ...scope.split(' ')],
  features: {
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client, oneOf) => oneOf,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        if (!(resource in resources)) throw new errors.InvalidTarget();
        return { scope, audience: resource, accessTokenTTL: 300, ...resources[resource] };
      },
    },
  },
});
provider.on('server_error', (ctx, error) => console.error('server_error', error));
provider.listen(port, '127.0.0.1', () => console.log(`listening ${issuer}`));
