"""A WSDL for the vSphere calls of ``virtman.guest.vcenter``, for vCenters that serve none.

oslo.vmware reads the service description from ``https://HOST/sdk/vimService.wsdl``. A real
vCenter serves it; govmomi's simulator answers 404, and oslo.vmware ships only the schemas
(``wsdl/8.0/*-types.xsd``), not the message types. This module writes the messages, port type
and binding of just the methods the backend calls, over those shipped schemas
(``[vcenter] generate_wsdl``).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

MOR = "vim25:ManagedObjectReference"
# method -> (parameters after _this as (name, type, optional, many), return type or None)
METHODS: dict[str, tuple[list[tuple[str, str, bool, bool]], tuple[str, bool] | None]] = {
    "RetrieveServiceContent": ([], ("vim25:ServiceContent", False)),
    "Login": (
        [("userName", "xsd:string", False, False), ("password", "xsd:string", False, False),
         ("locale", "xsd:string", True, False)],
        ("vim25:UserSession", False),
    ),
    "Logout": ([], None),
    "SessionIsActive": (
        [("sessionID", "xsd:string", False, False), ("userName", "xsd:string", False, False)],
        ("xsd:boolean", False),
    ),
    "CreateVM_Task": (
        [("config", "vim25:VirtualMachineConfigSpec", False, False), ("pool", MOR, False, False),
         ("host", MOR, True, False)],
        (MOR, False),
    ),
    "PowerOnVM_Task": ([("host", MOR, True, False)], (MOR, False)),
    "PowerOffVM_Task": ([], (MOR, False)),
    "Destroy_Task": ([], (MOR, False)),
    "ResetVM_Task": ([], (MOR, False)),
    "SuspendVM_Task": ([], (MOR, False)),
    "ReconfigVM_Task": ([("spec", "vim25:VirtualMachineConfigSpec", False, False)], (MOR, False)),
    "AddInternetScsiSendTargets": (
        [("iScsiHbaDevice", "xsd:string", False, False),
         ("targets", "vim25:HostInternetScsiHbaSendTarget", False, True)],
        None,
    ),
    "RescanHba": ([("hbaDevice", "xsd:string", False, False)], None),
    "FindByUuid": (
        [("datacenter", MOR, True, False), ("uuid", "xsd:string", False, False),
         ("vmSearch", "xsd:boolean", False, False), ("instanceUuid", "xsd:boolean", True, False)],
        (MOR, False),
    ),
    "FindAllByUuid": (
        [("datacenter", MOR, True, False), ("uuid", "xsd:string", False, False),
         ("vmSearch", "xsd:boolean", False, False), ("instanceUuid", "xsd:boolean", True, False)],
        (MOR, True),
    ),
    "RetrievePropertiesEx": (
        [("specSet", "vim25:PropertyFilterSpec", False, True),
         ("options", "vim25:RetrieveOptions", False, False)],
        ("vim25:RetrieveResult", False),
    ),
    "ContinueRetrievePropertiesEx": (
        [("token", "xsd:string", False, False)], ("vim25:RetrieveResult", False)
    ),
    "CancelRetrievePropertiesEx": ([("token", "xsd:string", False, False)], None),
}  # fmt: skip


def _element(name: str, fields: list[tuple[str, str, bool, bool]]) -> str:
    rows = "".join(
        f'<element name="{field}" type="{kind}" minOccurs="{0 if optional else 1}"'
        f' maxOccurs="{"unbounded" if many else 1}"/>'
        for field, kind, optional, many in fields
    )
    return (
        f'<element name="{name}"><complexType><sequence>{rows}</sequence></complexType></element>'
    )


def render(schema_dir: Path) -> str:
    """The WSDL text; ``schema_dir`` holds oslo.vmware's ``vim-types.xsd`` and siblings."""
    elements, messages, ops, bindings = [], [], [], []
    for method, (params, returns) in METHODS.items():
        elements.append(_element(method, [("_this", MOR, False, False), *params]))
        out = [] if returns is None else [("returnval", returns[0], True, returns[1])]
        elements.append(_element(f"{method}Response", out))
        for kind in ("Request", "Response"):
            part = method if kind == "Request" else f"{method}Response"
            messages.append(
                f'<message name="{method}{kind}Msg">'
                f'<part name="parameters" element="vim25:{part}"/></message>'
            )
        ops.append(
            f'<operation name="{method}"><input message="vim25:{method}RequestMsg"/>'
            f'<output message="vim25:{method}ResponseMsg"/></operation>'
        )
        bindings.append(
            f'<operation name="{method}"><soap:operation soapAction="urn:vim25/8.0"/>'
            '<input><soap:body use="literal"/></input>'
            '<output><soap:body use="literal"/></output></operation>'
        )
    imports = "".join(
        f'<import namespace="{ns}" schemaLocation="{(schema_dir / name).as_uri()}"/>'
        for ns, name in (
            ("urn:vim25", "core-types.xsd"),
            ("urn:reflect", "reflect-types.xsd"),
            ("urn:vim25", "query-types.xsd"),
            ("urn:vim25", "vim-types.xsd"),
        )
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<definitions targetNamespace="urn:vim25" xmlns="http://schemas.xmlsoap.org/wsdl/"'
        ' xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/" xmlns:vim25="urn:vim25"'
        ' xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
        '<types><schema targetNamespace="urn:vim25" xmlns="http://www.w3.org/2001/XMLSchema"'
        ' elementFormDefault="qualified">'
        f"{imports}{''.join(elements)}</schema></types>"
        f"{''.join(messages)}"
        f'<portType name="VimPortType">{"".join(ops)}</portType>'
        '<binding name="VimBinding" type="vim25:VimPortType">'
        '<soap:binding style="document" transport="http://schemas.xmlsoap.org/soap/http"/>'
        f"{''.join(bindings)}</binding>"
        '<service name="VimService"><port binding="vim25:VimBinding" name="VimPort">'
        '<soap:address location="https://localhost/sdk"/></port></service></definitions>\n'
    )


def write(path: Path) -> str:
    """Write the WSDL to ``path`` (over oslo.vmware's installed 8.0 schemas); its file URL."""
    schemas = Path(str(importlib.resources.files("oslo_vmware") / "wsdl" / "8.0"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(schemas))
    tmp.replace(path)
    return path.as_uri()
