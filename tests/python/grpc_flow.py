"""A gRPC client for Sigil generated from proto/ with grpcio-tools.

Drives: bootstrap token -> Sign -> Renew over mTLS with the new certificate
(re-keyed) -> Revoke -> Renew refused. Prints one JSON object with what it saw;
the Rust test asserts on it. Needs: grpcio, grpcio-tools, and openssl on PATH
(for keys and CSRs).

Then, as a relying party with Python `cryptography`: OCSP (POST to the URL in
the certificate) must say revoked within 5 s and the CRL must list it within
10 s.

usage: grpc_flow.py PROTO_DIR WORK_DIR HOST:PORT ROOTS_PEM TOKEN NAME
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import grpc
from grpc_tools import protoc


def generate(proto_dir, out_dir):
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(proto_dir, "sigil/v1/ca.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)


def key_and_csr(work, stem, name):
    key = os.path.join(work, f"{stem}.key")
    csr = os.path.join(work, f"{stem}.csr")
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", csr, "-outform", "DER",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True)
    with open(key, "rb") as k, open(csr, "rb") as c:
        return k.read(), c.read()


def main():
    proto_dir, work, target, roots_path, token, name = sys.argv[1:7]
    gen = os.path.join(work, "pygen")
    os.makedirs(gen, exist_ok=True)
    generate(proto_dir, gen)
    from sigil.v1 import ca_pb2, ca_pb2_grpc  # noqa: E402

    with open(roots_path, "rb") as f:
        roots = f.read()
    host = target.rsplit(":", 1)[0]
    opts = (("grpc.ssl_target_name_override", host),)
    seen = {}

    def stub(key=None, chain=None):
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=key, certificate_chain=chain)
        return ca_pb2_grpc.CertificateAuthorityStub(
            grpc.secure_channel(target, creds, options=opts))

    # Trust bundle, no client certificate.
    bundle = stub().GetTrustBundle(ca_pb2.TrustBundleRequest(), timeout=30)
    seen["bundle_has_root"] = roots.decode().strip() in bundle.roots_pem
    seen["bundle_intermediates"] = bundle.intermediates_pem.count("BEGIN CERTIFICATE")

    # First certificate with the bootstrap token.
    key1, csr1 = key_and_csr(work, "py1", name)
    first = stub().Sign(ca_pb2.SignRequest(csr=csr1), timeout=30,
                        metadata=(("authorization", f"Bearer {token}"),))
    seen["sign_serial"] = first.serial
    seen["sign_chain_len"] = len(first.chain_der)
    seen["sign_renew_after_inside"] = first.not_before < first.renew_after < first.not_after

    # The same request again (its reply lost) gets the same certificate.
    again = stub().Sign(ca_pb2.SignRequest(csr=csr1), timeout=30,
                        metadata=(("authorization", f"Bearer {token}"),))
    seen["repeat_same_serial"] = again.serial == first.serial

    # The token with another key is refused.
    _, csr_other = key_and_csr(work, "py-replay", name)
    try:
        stub().Sign(ca_pb2.SignRequest(csr=csr_other), timeout=30,
                    metadata=(("authorization", f"Bearer {token}"),))
        seen["replay"] = "OK"
    except grpc.RpcError as e:
        seen["replay"] = e.code().name

    # Renew over mTLS with the first certificate, with a new key.
    key2, csr2 = key_and_csr(work, "py2", name)
    second = stub(key1, first.chain_pem.encode()).Renew(ca_pb2.RenewRequest(csr=csr2), timeout=30)
    seen["renew_serial"] = second.serial
    with open(os.path.join(work, "py-renewed.pem"), "w") as f:
        f.write(second.chain_pem)

    # Revoke the renewed certificate with itself, then renewing with it fails.
    client2 = stub(key2, second.chain_pem.encode())
    rev = client2.Revoke(ca_pb2.RevokeRequest(reason=4), timeout=30)
    seen["revoked_serial"] = rev.serial
    try:
        stub(key2, second.chain_pem.encode()).Renew(ca_pb2.RenewRequest(), timeout=30)
        seen["renew_after_revoke"] = "OK"
    except grpc.RpcError as e:
        seen["renew_after_revoke"] = e.code().name
        seen["renew_after_revoke_detail"] = e.details()

    seen.update(relying_party(second.chain_pem.encode()))
    print(json.dumps(seen))


def relying_party(chain_pem):
    """Checks the revoked certificate the way a relying party would."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509 import ocsp
    from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID

    certs = x509.load_pem_x509_certificates(chain_pem)
    leaf, issuer = certs[0], certs[1]
    aia = leaf.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_INFORMATION_ACCESS).value
    ocsp_url = next(d.access_location.value for d in aia
                    if d.access_method == AuthorityInformationAccessOID.OCSP)
    cdp = leaf.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS).value
    crl_url = cdp[0].full_name[0].value
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    out = {"ocsp": "timeout", "crl": "timeout"}
    deadline = time.time() + 5
    while time.time() < deadline:
        http = urllib.request.Request(
            ocsp_url, data=req.public_bytes(serialization_der()),
            headers={"Content-Type": "application/ocsp-request"})
        resp = ocsp.load_der_ocsp_response(urllib.request.urlopen(http, timeout=10).read())
        if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            out["ocsp"] = str(resp.response_status)
            break
        if resp.certificate_status == ocsp.OCSPCertStatus.REVOKED:
            out["ocsp"] = "revoked"
            out["ocsp_reason"] = resp.revocation_reason.name if resp.revocation_reason else None
            # The responder certificate is delegated by the issuer.
            out["ocsp_responder_issued_by_issuer"] = any(
                c.issuer == issuer.subject for c in resp.certificates)
            break
        time.sleep(0.25)
    deadline = time.time() + 10
    while time.time() < deadline:
        crl = x509.load_der_x509_crl(urllib.request.urlopen(crl_url, timeout=10).read())
        if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
            out["crl"] = "listed"
            out["crl_signature_valid"] = crl.is_signature_valid(issuer.public_key())
            break
        time.sleep(0.5)
    return out


def serialization_der():
    from cryptography.hazmat.primitives.serialization import Encoding
    return Encoding.DER


if __name__ == "__main__":
    main()
