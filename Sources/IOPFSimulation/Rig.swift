// Rig.swift — the setup that serve, bench and stress share: an engine over this process's
// memory, a running service, domains whose IOTLB syncs reach the in-process devices, and
// in-process simulated devices attached over the service's transport. A device maps the
// regions it is given from their memfds, as a device in another process does, and does
// its DMA through that mapping.

import IOPFCore
import IOPFDevice
import IOPFService
import IOPFSystem
import Logging
import SystemPackage

/// A domain's in-process sync target: every attached in-process device's IOTLB.
package final class DomainIOTLBs: IOTLBInvalidator, Sendable {
    private let devices = Lock<[DeviceIOTLB]>([])
    package init() {}
    package func add(_ iotlb: DeviceIOTLB) { devices.withLock { $0.append(iotlb) } }
    package func remove(_ iotlb: DeviceIOTLB) { devices.withLock { $0.removeAll { $0 === iotlb } } }
    package func invalidate(_ ranges: [IOVARange]) {
        for d in devices.withLock({ $0 }) { d.invalidate(ranges) }
    }
}

final class Rig {
    let engine: FaultEngine
    let service: FaultService
    let fanouts: [DomainIOTLBs]
    let domains: [DomainID]
    let audits: [TranslationAudit?]

    /// Starts a service over a new engine; stop it with `service.stop()`. Each domain's
    /// syncs are reported to its observer; in-process devices check themselves against it
    /// when it is a `TranslationAudit`.
    init(
        engine config: EngineConfiguration, service serviceConfig: ServiceConfiguration, domains count: Int,
        observers: [(any IOTLBSyncObserver)?]? = nil, logger: Logger
    ) throws {
        engine = FaultEngine(memory: ProcessMemory(), configuration: config)
        service = try FaultService(engine: engine, configuration: serviceConfig, logger: logger)
        fanouts = (0..<count).map { _ in DomainIOTLBs() }
        audits = (0..<count).map { observers?[$0] as? TranslationAudit }
        domains = try (0..<count).map { [service, fanouts] d in
            try service.createDomain(local: fanouts[d], observer: observers?[d])
        }
        try service.start()
    }

    /// Attaches an in-process device to domain `domainIndex` and builds it over `regions`.
    func device(_ dc: DeviceConfiguration, domain domainIndex: Int, regions: [HostRegion]) throws -> SimulatedDevice {
        let domain = domains[domainIndex]
        let channel = try DeviceChannel(
            try service.attach(deviceID: dc.deviceID, pasid: dc.pasid, domain: domain, credit: dc.credit))
        let memory = try DeviceMemory(try regions.map { ($0.info!, FileDescriptor(rawValue: try Sys.dup($0.fd))) })
        let device = SimulatedDevice(
            configuration: dc, channel: channel, memory: memory,
            translator: .pageTable(engine.pageTable(domain)), window: service.window,
            audit: audits[domainIndex])
        fanouts[domainIndex].add(device.iotlb)
        return device
    }

    func remove(_ device: SimulatedDevice, domain domainIndex: Int) {
        fanouts[domainIndex].remove(device.iotlb)
    }
}
